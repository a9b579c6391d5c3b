"""Client optimizers vectorized over the leading client axis of a `[K, P, D]` prompt bank.

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
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None


def init_client_state(opt: ClientOptimizer, bank: torch.Tensor) -> ClientOptState:
    k = bank.shape[0]
    if opt.name == "adam":
        return ClientOptState(torch.zeros(k, dtype=torch.long), torch.zeros_like(bank),
                              torch.zeros_like(bank))
    return ClientOptState(torch.zeros(k, dtype=torch.long))


def client_step(opt: ClientOptimizer, bank: torch.Tensor, grads: torch.Tensor,
                state: ClientOptState, active: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """One optimizer step for the active clients; returns the new bank, updates `state`.

    `active` is a `[K]` bool mask, `lr` a `[K]` float tensor.
    """
    if opt.name not in CLIENT_OPTIMIZERS:
        raise ValueError(f"unknown client optimizer {opt.name!r}")
    state.step += active.long()
    shape = (-1,) + (1,) * (bank.dim() - 1)
    on = active.view(shape)
    lr_b = lr.to(bank.dtype).view(shape)
    if opt.name == "sgd":
        if opt.weight_decay:
            grads = grads + opt.weight_decay * bank
        return torch.where(on, bank - lr_b * grads, bank)
    b1, b2 = opt.betas
    stepped = bank * (1 - lr_b * opt.weight_decay) if opt.weight_decay else bank
    exp_avg = torch.where(on, state.exp_avg.lerp(grads, 1 - b1), state.exp_avg)
    exp_avg_sq = torch.where(on, state.exp_avg_sq * b2 + (1 - b2) * grads * grads,
                             state.exp_avg_sq)
    steps = state.step.clamp(min=1).double()
    bias1 = (1 - b1 ** steps).to(bank.dtype).view(shape)
    bias2_sqrt = (1 - b2 ** steps).sqrt().to(bank.dtype).view(shape)
    denom = exp_avg_sq.sqrt() / bias2_sqrt + opt.eps
    new = stepped - (lr_b / bias1) * exp_avg / denom
    state.exp_avg, state.exp_avg_sq = exp_avg, exp_avg_sq
    return torch.where(on, new, bank)
