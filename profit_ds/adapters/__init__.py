"""Adapters: what a client trains on the frozen backbone, one module each, registered here by
name (`--adapter`).

The federated code sees only a client state (`fl/state.py`); the adapter (`base.Adapter`) is
what turns a bank of such states into per-client losses over a mixed batch of rows, into
generations and into a PEFT export. The registry names modules instead of importing them, so
`profit_ds.config` lists the choices without importing torch. Each module defines `ADAPTER`,
a factory taking the run's config. Adding an adapter is its module and its line below.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from profit_ds.adapters.base import Adapter
    from profit_ds.config import RunConfig

ADAPTERS = {
    "prompt": "profit_ds.adapters.prompt",
    "lora": "profit_ds.adapters.lora",
}


def create(cfg: "RunConfig") -> "Adapter":
    """The adapter `cfg.adapter` names, with its settings from `cfg`."""
    return importlib.import_module(ADAPTERS[cfg.adapter]).ADAPTER.from_config(cfg)
