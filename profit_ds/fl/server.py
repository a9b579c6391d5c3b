"""Server optimizers (FedOpt, Reddi et al. 2021) applied to the aggregated client update.

The server sees one pseudo-update `delta` per round (a global state, `fl/state.py`): for FedAvg
the example-weighted mean of the clients' changes, for FedSGD minus the example-weighted mean
gradient. Every leaf steps alone (elementwise arithmetic). SGD with lr 1 on
FedAvg's delta is plain averaging (McMahan et al.); Adam, Yogi and Adagrad are FedAdam, FedYogi
and FedAdagrad, with Reddi et al.'s adaptivity `tau` in place of epsilon and no bias correction.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from profit_ds.fl.state import State, flatten, unflatten

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
    """What the server optimizer carries between rounds (checkpointed with the global state)."""

    step: int = 0
    m: State | None = None
    v: State | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**flatten("m", self.m), **flatten("v", self.v)}

    @classmethod
    def from_tensors(cls, step: int, tensors: dict[str, torch.Tensor]) -> "ServerState":
        return cls(step, unflatten("m", tensors), unflatten("v", tensors))


def server_update(opt: ServerOptimizer, model: State, delta: State, state: ServerState
                  ) -> State:
    """Apply one server step to the global state; updates `state` in place."""
    if opt.name not in SERVER_OPTIMIZERS:
        raise ValueError(f"unknown server optimizer {opt.name!r}")
    state.step += 1
    m = state.m or {}
    v = state.v or {}
    new: State = {}
    for name, d in delta.items():
        if opt.name == "sgd":
            if opt.momentum:
                m[name] = d.clone() if name not in m else opt.momentum * m[name] + d
                d = m[name]
            new[name] = model[name] + opt.lr * d
            continue
        new[name], m[name], v[name] = _adaptive(opt, model[name], d, m.get(name), v.get(name))
    state.m, state.v = m or None, v or None
    return new


def _adaptive(opt: ServerOptimizer, x: torch.Tensor, delta: torch.Tensor,
              m: torch.Tensor | None, v: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FedAdam / FedYogi / FedAdagrad on one leaf; returns (x, m, v)."""
    b1, b2 = opt.betas
    m = (1 - b1) * delta if m is None else b1 * m + (1 - b1) * delta
    sq = delta * delta
    if v is None:
        v = torch.zeros_like(delta)
    if opt.name == "adam":
        v = b2 * v + (1 - b2) * sq
    elif opt.name == "yogi":
        v = v - (1 - b2) * sq * torch.sign(v - sq)
    else:  # adagrad
        v = v + sq
    return x + opt.lr * m / (v.sqrt() + opt.tau), m, v
