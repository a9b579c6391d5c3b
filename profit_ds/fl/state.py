"""Client state as a typed tree: a dict of named tensors, every leaf with a leading client axis.

What a client trains is an adapter's parameters: for prompt tuning `{"prompt": [K, P, D]}`, for
LoRA an A and a B per target module. The federated code (optimizers, aggregation, server
steps, proximal terms, interpolation, checkpoints) never looks inside a leaf: it only needs
these few operations, applied leaf by leaf, so any adapter's state goes through the same code.

A *bank* holds K rows (clients, or (client, lr) pairs); a *global* state is one row without
the leading axis (the server's model). Per-row scalars (a learning rate, a proximal weight, an
`active` mask) are `[K]` tensors broadcast over each leaf's other axes by `per_row`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

State = dict[str, torch.Tensor]


def leafwise(fn: Callable[..., torch.Tensor], *states: State) -> State:
    """`fn` applied to the same-named leaves of `states` (all must have the same names)."""
    names = states[0].keys()
    for s in states[1:]:
        if s.keys() != names:
            raise ValueError(f"state leaves differ: {sorted(names)} vs {sorted(s.keys())}")
    return {name: fn(*(s[name] for s in states)) for name in names}


def num_rows(state: State) -> int:
    """K, the leading (client) axis every leaf of a bank shares."""
    return next(iter(state.values())).shape[0]


def per_row(values: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A `[K]` tensor shaped to broadcast over a `[K, ...]` leaf, in the leaf's dtype (masks
    stay bool)."""
    shaped = values.view((-1,) + (1,) * (leaf.dim() - 1))
    return shaped if values.dtype == torch.bool else shaped.to(leaf.dtype)


def expand(state: State, k: int) -> State:
    """A bank of k copies of the global `state` (real copies: each row is trained apart)."""
    return {n: t.unsqueeze(0).repeat(k, *(1,) * t.dim()) for n, t in state.items()}


def take(bank: State, index: torch.Tensor | Sequence[int]) -> State:
    """The rows `index` of a bank, in that order (an `index_select`: see model/prompted.py)."""
    idx = torch.as_tensor(index, dtype=torch.long)
    return {n: t.index_select(0, idx) for n, t in bank.items()}


def row(bank: State, k: int) -> State:
    """Row k of a bank as a global state (a copy)."""
    return {n: t[k].clone() for n, t in bank.items()}


def cat(banks: Sequence[State]) -> State:
    """Banks stacked along the client axis."""
    return leafwise(lambda *ts: torch.cat(ts), *banks)


def where(mask: torch.Tensor, a: State, b: State) -> State:
    """Row k from `a` where `mask[k]`, else from `b`: a masked update."""
    return leafwise(lambda x, y: torch.where(per_row(mask, x), x, y), a, b)


def sub(a: State, b: State) -> State:
    """a - b, leaf by leaf (b may be a global state: it broadcasts over a bank's rows)."""
    return leafwise(torch.sub, a, b)


def add(a: State, b: State, scale: float | torch.Tensor = 1.0) -> State:
    """a + scale * b; `scale` a float or a `[K]` per-row tensor."""
    if isinstance(scale, torch.Tensor):
        return leafwise(lambda x, y: x + per_row(scale, y) * y, a, b)
    return leafwise(lambda x, y: x + scale * y, a, b)


def scale(state: State, factor: float | torch.Tensor) -> State:
    """factor * state; `factor` a float or a `[K]` per-row tensor."""
    if isinstance(factor, torch.Tensor):
        return {n: per_row(factor, t) * t for n, t in state.items()}
    return {n: factor * t for n, t in state.items()}


def zeros_like(state: State) -> State:
    return {n: torch.zeros_like(t) for n, t in state.items()}


def weighted_mean(bank: State, weights: Sequence[float]) -> State:
    """The global state sum_k w_k bank[k] / sum_k w_k (FedAvg's example weighting)."""
    def mean(t: torch.Tensor) -> torch.Tensor:
        w = torch.tensor(list(weights), dtype=t.dtype)
        return (per_row(w, t) * t).sum(0) / w.sum()
    return {n: mean(t) for n, t in bank.items()}


def finite_rows(bank: State) -> torch.Tensor:
    """`[K]` bool: whether every leaf's row k is all finite."""
    ok = torch.ones(num_rows(bank), dtype=torch.bool)
    for t in bank.values():
        ok &= torch.isfinite(t.detach().reshape(t.shape[0], -1).float()).all(dim=1).cpu()
    return ok


def norm(state: State) -> float:
    """The L2 norm over all leaves together (in the leaves' dtype: it overflows where they
    would)."""
    return float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in state.values()])))


def flatten(prefix: str, state: State | None) -> dict[str, torch.Tensor]:
    """`state`'s leaves under `prefix/` (checkpoint keys); nothing for None."""
    return {f"{prefix}/{n}": t for n, t in (state or {}).items()}


def unflatten(prefix: str, tensors: dict[str, torch.Tensor]) -> State | None:
    """The state `flatten(prefix, ...)` wrote into `tensors`; None if it wrote nothing."""
    head = prefix + "/"
    found = {k[len(head):]: t for k, t in tensors.items() if k.startswith(head)}
    return found or None
