"""FedSGD: each sampled client returns one gradient of its mean loss over all its local
examples (batch size infinity, one step); the server applies its optimizer to minus their
example-weighted mean."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from profit_ds.fl.algorithms.base import ClientWork, Stateless
from profit_ds.fl.clients import ClientData
from profit_ds.fl.gradients import mean_loss_gradients
from profit_ds.fl.state import State, scale


@dataclass
class FedSGD(Stateless):
    name: str = "fedsgd"

    def client_updates(self, work: ClientWork, model: State, group: Sequence[ClientData]
                       ) -> tuple[State, torch.Tensor]:
        rows = [(k, e) for k, c in enumerate(group) for e in c.train]
        grads, losses = mean_loss_gradients(work.backbone, work.start(model, group), rows,
                                            len(rows), self.spec.adapter)
        if work.after_step:
            work.after_step()
        return scale(grads, -1.0), losses


ALGORITHM = FedSGD
