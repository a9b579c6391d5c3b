"""One federated round: sample clients, client updates, example-weighted aggregation, server step.

FedAvg (McMahan et al. 2017): each sampled client starts from the global prompt, runs
`local_epochs` of its client optimizer, and returns its prompt change; the server averages the
changes weighted by the clients' example counts and applies the server optimizer to that.
FedSGD: each sampled client returns one gradient of its mean loss over all its local examples
(batch size infinity, one step); the server applies its optimizer to minus their weighted mean.

Clients are processed `k_parallel` at a time in one prompt bank; the result does not depend on
`k_parallel` (each client's gradient and optimizer trajectory is its own).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from profit_ds.fl.clients import ClientData, local_batches
from profit_ds.fl.divergence import Diverged, finite_rows
from profit_ds.fl.gradients import mean_loss_gradients
from profit_ds.fl.local import run_local_steps
from profit_ds.fl.optim import ClientOptimizer, init_client_state
from profit_ds.fl.server import ServerOptimizer, ServerState, server_update
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


def sample_clients(num_clients: int, per_round: int, seed: int, round_idx: int) -> list[int]:
    """The clients of round `round_idx`: a function of (seed, round) only, so a resumed run
    samples exactly what an uninterrupted one would."""
    return sorted(random.Random(f"{seed}/sample/{round_idx}").sample(range(num_clients), per_round))


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def client_updates(backbone: Backbone, prompt: torch.Tensor, clients: Sequence[ClientData],
                   spec: RoundSpec, round_idx: int, k_parallel: int,
                   after_step: Callable[[], None] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each client's update direction (FedAvg: prompt change; FedSGD: minus its gradient), and
    its mean training loss. Shapes `[M, P, D]` and `[M]`."""
    directions, losses = [], []
    for group in chunks(clients, k_parallel):
        bank = prompt.unsqueeze(0).repeat(len(group), 1, 1)
        if spec.algo == "fedsgd":
            rows = [(k, e) for k, c in enumerate(group) for e in c.train]
            grads, loss = mean_loss_gradients(backbone, bank, rows, len(rows))
            directions.append(-grads)
            if after_step:
                after_step()
        else:
            schedules = [[[c.train[i] for i in batch] for batch in local_batches(
                c.num_examples, spec.local_epochs, spec.batch_size,
                f"{spec.seed}/round{round_idx}/{c.name}")] for c in group]
            lr = torch.full((len(group),), spec.client_lr)
            state = init_client_state(spec.client_opt, bank)
            new_bank, loss = run_local_steps(backbone, bank, spec.client_opt, state, lr,
                                             schedules, after_step=after_step)
            directions.append(new_bank - bank)
        losses.append(loss)
    return torch.cat(directions), torch.cat(losses)


def aggregate(directions: torch.Tensor, num_examples: Sequence[int]) -> torch.Tensor:
    """Example-weighted mean of the clients' update directions."""
    w = torch.tensor(num_examples, dtype=directions.dtype)
    return (w.view(-1, 1, 1) * directions).sum(0) / w.sum()


def federated_round(backbone: Backbone, prompt: torch.Tensor, state: ServerState,
                    train_clients: Sequence[ClientData], spec: RoundSpec, round_idx: int,
                    k_parallel: int, after_step: Callable[[], None] | None = None
                    ) -> tuple[torch.Tensor, dict]:
    """Run round `round_idx` (1-based); returns the new global prompt and the round's metrics."""
    picked = sample_clients(len(train_clients), spec.clients_per_round, spec.seed, round_idx)
    clients = [train_clients[i] for i in picked]
    directions, losses = client_updates(backbone, prompt, clients, spec, round_idx, k_parallel,
                                        after_step)
    ok = finite_rows(losses.unsqueeze(1), directions)
    if not ok.all():
        bad = clients[int((~ok).nonzero()[0])]
        raise Diverged("federated training", "non-finite loss or update", round_idx, bad.name)
    weights = [c.num_examples for c in clients]
    delta = aggregate(directions, weights)
    new_prompt = server_update(spec.server_opt, prompt, delta, state)
    update_norm = float(delta.norm())  # in the prompts' fp32: overflows where they would
    if not (finite_rows(new_prompt.unsqueeze(0)).all() and math.isfinite(update_norm)):
        raise Diverged("federated training", "the aggregated update or the server step is not "
                       "finite (overflow)", round_idx)
    train_loss = float((torch.tensor(weights, dtype=torch.float32) * losses).sum() / sum(weights))
    return new_prompt, {"round": round_idx, "train_loss": train_loss,
                        "clients": [c.name for c in clients], "update_norm": update_norm}
