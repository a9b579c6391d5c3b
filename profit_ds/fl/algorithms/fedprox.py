"""FedProx (Li et al. 2020): FedAvg whose clients minimize their loss plus
(mu / 2) ||w - w_global||^2, which holds each client near the round's global state when local
data are heterogeneous. At mu = 0 it is FedAvg exactly (the term is not even added). The
anchor is where the client started: the global state, with FedSA-LoRA's private B its own."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from profit_ds.fl.algorithms.fedavg import FedAvg
from profit_ds.fl.clients import ClientData
from profit_ds.fl.local import GradTerm
from profit_ds.fl.proximal import proximal
from profit_ds.fl.state import State


@dataclass
class FedProx(FedAvg):
    name: str = "fedprox"

    def extra_grad(self, model: State, start: State, group: Sequence[ClientData]
                   ) -> GradTerm | None:
        if not self.spec.prox_mu:
            return None
        return proximal(start, torch.full((len(group),), self.spec.prox_mu))


ALGORITHM = FedProx
