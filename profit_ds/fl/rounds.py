"""One federated round: sample clients, client updates, example-weighted aggregation, server step.

What a client computes is the algorithm's (`fl/algorithms/`, one module each: FedAvg, FedSGD,
...); this module is what every algorithm shares. Clients are processed `k_parallel` at a time
in one bank; the result does not depend on `k_parallel` (each client's gradient and optimizer
trajectory is its own).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from profit_ds.adapters.base import Adapter
from profit_ds.adapters.prompt import PROMPT
from profit_ds.fl.algorithms.base import Algorithm, ClientWork
from profit_ds.fl.clients import ClientData
from profit_ds.fl.divergence import Diverged
from profit_ds.fl.optim import ClientOptimizer
from profit_ds.fl.server import ServerOptimizer, ServerState, server_update
from profit_ds.fl.state import State, cat, finite_rows, norm, weighted_mean
from profit_ds.model.backbone import Backbone


@dataclass(frozen=True)
class RoundSpec:
    algo: str
    client_opt: ClientOptimizer
    client_lr: float
    local_epochs: int
    batch_size: int
    server_opt: ServerOptimizer
    clients_per_round: int
    seed: int
    prox_mu: float = 0.0
    adapter: Adapter = PROMPT


def sample_clients(num_clients: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """The clients of round `round_idx`: a function of (seed, round) only, so a resumed run
    samples exactly what an uninterrupted one would."""
    return sorted(random.Random(f"{seed}/sample/{round_idx}").sample(range(num_clients), per_round))


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def federated_round(backbone: Backbone, model: State, server: ServerState, algorithm: Algorithm,
                    train_clients: Sequence[ClientData], spec: RoundSpec, round_idx: int,
                    k_parallel: int, after_step: Callable[[], None] | None = None,
                    private: dict[str, State] | None = None) -> tuple[State, dict]:
    """Run round `round_idx` (1-based); returns the new global state and the round's metrics.

    `private` (client name -> leaves, updated in place) holds what clients keep between
    rounds instead of taking the global state's (`Adapter.private`: FedSA-LoRA's B)."""
    picked = sample_clients(len(train_clients), spec.clients_per_round, spec.seed, round_idx)
    clients = [train_clients[i] for i in picked]
    work = ClientWork(backbone, spec, round_idx, after_step,
                      private if private is not None else {})
    directions, losses = [], []
    for group in chunks(clients, k_parallel):
        d, loss = algorithm.client_updates(work, model, group)
        directions.append(d)
        losses.append(loss)
    bank, losses = cat(directions), torch.cat(losses)
    ok = finite_rows(bank) & torch.isfinite(losses)
    if not ok.all():
        bad = clients[int((~ok).nonzero()[0])]
        raise Diverged("federated training", "non-finite loss or update", round_idx, bad.name)
    weights = [c.num_examples for c in clients]
    delta = weighted_mean(bank, weights)
    new_model = server_update(spec.server_opt, model, delta, server)
    update_norm = norm(delta)  # in the states' fp32: overflows where they would
    if not (finite_rows({n: t.unsqueeze(0) for n, t in new_model.items()}).all()
            and math.isfinite(update_norm)):
        raise Diverged("federated training", "the aggregated update or the server step is not "
                       "finite (overflow)", round_idx)
    algorithm.end_round(clients, len(train_clients))
    train_loss = float((torch.tensor(weights, dtype=torch.float32) * losses).sum() / sum(weights))
    return new_model, {"round": round_idx, "train_loss": train_loss,
                       "clients": [c.name for c in clients], "update_norm": update_norm}
