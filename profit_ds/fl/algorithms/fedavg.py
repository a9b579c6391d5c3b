"""FedAvg (McMahan et al. 2017): each sampled client starts from the global state, runs
`local_epochs` of its client optimizer, and returns its change; the server averages the
changes weighted by the clients' example counts and applies the server optimizer to that
(SGD with lr 1: plain averaging).

Variants that only add a term to the clients' gradients (FedProx, SCAFFOLD) subclass this and
override `extra_grad`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from profit_ds.fl.algorithms.base import ClientWork, Stateless
from profit_ds.fl.clients import ClientData
from profit_ds.fl.local import GradTerm, run_local_steps
from profit_ds.fl.optim import init_client_state
from profit_ds.fl.state import State, sub


@dataclass
class FedAvg(Stateless):
    name: str = "fedavg"

    def client_updates(self, work: ClientWork, model: State, group: Sequence[ClientData]
                       ) -> tuple[State, torch.Tensor]:
        bank = work.start(model, group)
        opt = self.spec.client_opt
        lr = torch.full((len(group),), self.spec.client_lr)
        new_bank, losses = run_local_steps(work.backbone, bank, opt, init_client_state(opt, bank),
                                           lr, work.schedules(group), after_step=work.after_step,
                                           extra_grad=self.extra_grad(model, bank, group),
                                           adapter=self.spec.adapter)
        work.finish(group, new_bank)
        return sub(new_bank, bank), losses

    def extra_grad(self, model: State, start: State, group: Sequence[ClientData]
                   ) -> GradTerm | None:
        """A term added to the group's loss gradients at every local step (none here);
        `start` is the group's starting bank (`ClientWork.start`)."""
        return None


ALGORITHM = FedAvg
