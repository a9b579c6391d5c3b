"""SCAFFOLD (Karimireddy et al. 2020): FedAvg with control variates that correct client drift.

The server keeps c, each client its own c_i (zero until the client is first sampled). At every
local step a client's gradient gets c - c_i added. After its K local steps at lr eta, it
updates c_i+ = c_i - c + (x - y_i) / (K eta) (the paper's option II, from the model change, so
no extra gradient pass). The server moves x by its optimizer on the example-weighted mean
change, as FedAvg, and c by (1/N) sum over the sampled clients of (c_i+ - c_i), N the number of
train clients.

Option II's estimate assumes SGD local steps; with Adam clients (`--client-opt adam`) the same
correction enters Adam's input gradient, a common but heuristic use. The variates are
checkpointed: a resumed run continues with the same c and c_i.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from profit_ds.fl.algorithms.base import ClientWork
from profit_ds.fl.algorithms.fedavg import FedAvg
from profit_ds.fl.clients import ClientData
from profit_ds.fl.local import GradTerm
from profit_ds.fl.state import (State, add, cat, expand, flatten, row, scale, sub, unflatten,
                                zeros_like)


@dataclass
class Scaffold(FedAvg):
    name: str = "scaffold"
    c: State | None = None                                     # the server's variate
    c_i: dict[str, State] = field(default_factory=dict)        # client name -> its variate
    pending: dict[str, State] = field(default_factory=dict)    # this round's new c_i

    def client_updates(self, work: ClientWork, model: State, group: Sequence[ClientData]
                       ) -> tuple[State, torch.Tensor]:
        directions, losses = super().client_updates(work, model, group)
        steps = torch.tensor([float(len(s)) for s in work.schedules(group)])
        # c_i+ = c_i - c + (x - y_i) / (K_i eta), with directions_i = y_i - x
        new = add(scale(self._correction(model, group), -1.0), directions,
                  -1.0 / (steps * self.spec.client_lr))
        for k, client in enumerate(group):
            self.pending[client.name] = row(new, k)
        return directions, losses

    def extra_grad(self, model: State, start: State, group: Sequence[ClientData]
                   ) -> GradTerm | None:
        correction = self._correction(model, group)
        return lambda bank: correction

    def _correction(self, model: State, group: Sequence[ClientData]) -> State:
        """c - c_i, one row per client of `group`."""
        c = self.c or zeros_like(model)
        return cat([expand(sub(c, self.c_i.get(g.name) or zeros_like(model)), 1) for g in group])

    def end_round(self, clients: Sequence[ClientData], num_clients: int) -> None:
        """c += (1/N) sum (c_i+ - c_i) over this round's clients; then c_i = c_i+."""
        some = next(iter(self.pending.values()))
        change = zeros_like(some)
        for name, new in self.pending.items():
            change = add(change, sub(new, self.c_i.get(name) or zeros_like(some)))
        self.c = add(self.c or zeros_like(some), change, 1.0 / num_clients)
        self.c_i.update(self.pending)
        self.pending = {}

    def tensors(self) -> dict[str, torch.Tensor]:
        """c, and each c_i keyed by its client's name in hex (any name, no separator)."""
        out = flatten("c", self.c)
        for name, ci in self.c_i.items():
            out.update(flatten(f"i/{name.encode().hex()}", ci))
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.c = unflatten("c", tensors)
        hexes = {k.split("/")[1] for k in tensors if k.startswith("i/")}
        self.c_i = {bytes.fromhex(h).decode(): unflatten(f"i/{h}", tensors) for h in hexes}


ALGORITHM = Scaffold
