"""Federated algorithms: one module each, registered here by name (`--algo`).

The registry names modules instead of importing them, so `profit_ds.config` can list the
choices without importing torch. Each module defines `ALGORITHM`, a factory taking the run's
`RoundSpec` and returning an `Algorithm` (`base.py`). Adding an algorithm is its module and
its line below.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from profit_ds.fl.algorithms.base import Algorithm
    from profit_ds.fl.rounds import RoundSpec

ALGORITHMS = {
    "fedavg": "profit_ds.fl.algorithms.fedavg",
    "fedsgd": "profit_ds.fl.algorithms.fedsgd",
    "fedprox": "profit_ds.fl.algorithms.fedprox",
    "scaffold": "profit_ds.fl.algorithms.scaffold",
}


def create(spec: "RoundSpec") -> "Algorithm":
    """The algorithm `spec.algo` names, with its state (if any) fresh."""
    if spec.algo not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {spec.algo!r}; known: {', '.join(ALGORITHMS)}")
    return importlib.import_module(ALGORITHMS[spec.algo]).ALGORITHM(spec)
