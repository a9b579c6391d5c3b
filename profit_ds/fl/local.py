"""Local training of a bank of client states: K clients step together, each on its own batches.

The one client loop: every algorithm's client update (FedAvg, FedProx, SCAFFOLD) and
personalization are "each client runs SGD/Adam on its own data, starting from the global
state", differing only in a term added to the gradient. Clients with fewer steps than others
are masked out once they are done, so each follows exactly the trajectory it would follow alone.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from profit_ds.adapters.base import Adapter
from profit_ds.adapters.prompt import PROMPT
from profit_ds.fl.gradients import mean_loss_gradients
from profit_ds.fl.optim import ClientOptimizer, ClientOptState, client_step
from profit_ds.fl.state import State, add
from profit_ds.memory import release_freed_memory
from profit_ds.model.backbone import Backbone
from profit_ds.model.prompted import Encoded

Schedule = Sequence[Sequence[Encoded]]  # one client's local steps, each a batch of examples


GradTerm = Callable[[State], State]  # bank -> a term added to its loss gradients


def run_local_steps(backbone: Backbone, bank: State, opt: ClientOptimizer,
                    state: ClientOptState, lr: torch.Tensor, schedules: Sequence[Schedule],
                    rows_per_forward: int | None = None,
                    after_step: Callable[[], None] | None = None,
                    extra_grad: GradTerm | None = None, adapter: Adapter = PROMPT
                    ) -> tuple[State, torch.Tensor]:
    """Run every client's schedule; returns the new bank and each client's mean training loss
    over its steps (`[K]`).

    `extra_grad(bank)` is added to the loss gradients before each step: a regularizer's
    gradient (the proximal term) or a correction (SCAFFOLD's control variates); the reported
    losses exclude it. Rows whose schedule is over are left untouched."""
    k = len(schedules)
    loss_total = torch.zeros(k)
    for t in range(max((len(s) for s in schedules), default=0)):
        active = torch.tensor([t < len(s) for s in schedules])
        rows = [(c, e) for c, s in enumerate(schedules) if t < len(s) for e in s[t]]
        grads, losses = mean_loss_gradients(backbone, bank, rows, rows_per_forward or len(rows),
                                            adapter)
        if extra_grad:
            grads = add(grads, extra_grad(bank))
        bank = client_step(opt, bank, grads, state, active, lr)
        loss_total += torch.where(active, losses, torch.zeros_like(losses))
        if after_step:
            after_step()
    steps = torch.tensor([max(len(s), 1) for s in schedules], dtype=torch.float32)
    release_freed_memory()  # saved activations, before scoring's KV caches
    return bank, loss_total / steps
