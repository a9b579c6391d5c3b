"""Client optimizers vectorized over the leading client axis of a bank (`fl/state.py`).

SGD and Adam are elementwise, so one update on the bank equals K independent updates, one per
client (DESIGN.md point 3). Each client has its own step count (Adam's bias correction), its own
learning rate (a personalization grid is K clients x lrs in one bank), and an `active` mask:
clients that have finished their local steps are left untouched while others go on.

The Adam arithmetic follows `torch.optim.Adam` (weight decay decoupled, as in AdamW), so each
client's trajectory matches PyTorch's optimizer to float rounding (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from profit_ds.fl.state import State, num_rows, per_row, zeros_like

CLIENT_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class ClientOptimizer:
    """Hyperparameters shared by the clients in a bank (the lr may differ per client)."""

    name: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass
class ClientOptState:
    step: torch.Tensor                 # [K] local steps taken
    exp_avg: State | None = None
    exp_avg_sq: State | None = None


def init_client_state(opt: ClientOptimizer, bank: State) -> ClientOptState:
    k = num_rows(bank)
    if opt.name == "adam":
        return ClientOptState(torch.zeros(k, dtype=torch.long), zeros_like(bank),
                              zeros_like(bank))
    return ClientOptState(torch.zeros(k, dtype=torch.long))


def client_step(opt: ClientOptimizer, bank: State, grads: State, state: ClientOptState,
                active: torch.Tensor, lr: torch.Tensor) -> State:
    """One optimizer step for the active clients; returns the new bank, updates `state`.

    `active` is a `[K]` bool mask, `lr` a `[K]` float tensor. Every leaf steps alone
    (elementwise arithmetic), so a state of any shape takes the same update.
    """
    if opt.name not in CLIENT_OPTIMIZERS:
        raise ValueError(f"unknown client optimizer {opt.name!r}")
    state.step += active.long()
    new: State = {}
    for name, leaf in bank.items():
        if opt.name == "sgd":
            new[name] = _sgd(opt, leaf, grads[name], active, lr)
        else:
            new[name], state.exp_avg[name], state.exp_avg_sq[name] = _adam(
                opt, leaf, grads[name], state.exp_avg[name], state.exp_avg_sq[name],
                state.step, active, lr)
    return new


def _sgd(opt: ClientOptimizer, leaf: torch.Tensor, grad: torch.Tensor, active: torch.Tensor,
         lr: torch.Tensor) -> torch.Tensor:
    if opt.weight_decay:
        grad = grad + opt.weight_decay * leaf
    return torch.where(per_row(active, leaf), leaf - per_row(lr, leaf) * grad, leaf)


def _adam(opt: ClientOptimizer, leaf: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
          exp_avg_sq: torch.Tensor, step: torch.Tensor, active: torch.Tensor, lr: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch.optim.Adam's arithmetic for one leaf; returns (leaf, exp_avg, exp_avg_sq)."""
    b1, b2 = opt.betas
    on, lr_b = per_row(active, leaf), per_row(lr, leaf)
    stepped = leaf * (1 - lr_b * opt.weight_decay) if opt.weight_decay else leaf
    exp_avg = torch.where(on, exp_avg.lerp(grad, 1 - b1), exp_avg)
    exp_avg_sq = torch.where(on, exp_avg_sq * b2 + (1 - b2) * grad * grad, exp_avg_sq)
    steps = step.clamp(min=1).double()
    bias1 = per_row(1 - b1 ** steps, leaf)
    bias2_sqrt = per_row((1 - b2 ** steps).sqrt(), leaf)
    denom = exp_avg_sq.sqrt() / bias2_sqrt + opt.eps
    new = stepped - (lr_b / bias1) * exp_avg / denom
    return torch.where(on, new, leaf), exp_avg, exp_avg_sq
