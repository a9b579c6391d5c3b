"""Server optimizers (FedOpt, Reddi et al. 2021) applied to the aggregated client update.

The server sees one pseudo-update `delta` per round: for FedAvg the example-weighted mean of the
clients' prompt changes, for FedSGD minus the example-weighted mean gradient. SGD with lr 1 on
FedAvg's delta is plain averaging (McMahan et al.); Adam, Yogi and Adagrad are FedAdam, FedYogi
and FedAdagrad, with Reddi et al.'s adaptivity `tau` in place of epsilon and no bias correction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SERVER_OPTIMIZERS = ("sgd", "adam", "yogi", "adagrad")


@dataclass(frozen=True)
class ServerOptimizer:
    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    tau: float = 1e-3


@dataclass
class ServerState:
    """Everything the server carries between rounds (checkpointed with the global prompt)."""

    step: int = 0
    m: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: t for k, t in (("m", self.m), ("v", self.v)) if t is not None}


def server_update(opt: ServerOptimizer, prompt: torch.Tensor, delta: torch.Tensor,
                  state: ServerState) -> torch.Tensor:
    """Apply one server step to the global prompt; updates `state` in place."""
    if opt.name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {opt.name!r}")
    state.step += 1
    if opt.name == "sgd":
        if opt.momentum:
            state.m = delta.clone() if state.m is None else opt.momentum * state.m + delta
            delta = state.m
        return prompt + opt.lr * delta
    b1, b2 = opt.betas
    state.m = (1 - b1) * delta if state.m is None else b1 * state.m + (1 - b1) * delta
    sq = delta * delta
    if state.v is None:
        state.v = torch.zeros_like(delta)
    if opt.name == "adam":
        state.v = b2 * state.v + (1 - b2) * sq
    elif opt.name == "yogi":
        state.v = state.v - (1 - b2) * sq * torch.sign(state.v - sq)
    else:  # adagrad
        state.v = state.v + sq
    return prompt + opt.lr * state.m / (state.v.sqrt() + opt.tau)
