"""Adapters: what a client trains on the frozen backbone, one module each, behind `Adapter`.

The federated code sees only a client state (`fl/state.py`); the adapter is what turns a bank
of such states into per-client losses over a mixed batch of rows. A new adapter is one module
and one line in `ADAPTERS`.
"""
from __future__ import annotations

from typing import Protocol

import torch

from profit_ds.fl.state import State
from profit_ds.model.prompted import TrainBatch


class Adapter(Protocol):
    name: str

    def extra_tokens(self, bank: State) -> int:
        """Positions the adapter adds to every row (P for a soft prompt): the token budgets
        and the attention kernel choice count them."""

    def loss_sums(self, model, bank: State, batch: TrainBatch,
                  checkpointing: bool = False) -> torch.Tensor:
        """`[K]` per-client sums of label-token cross-entropy, row r under its client's state
        `bank[batch.row_client[r]]`; the gradient flows back to `bank`'s leaves."""


def _registry() -> dict[str, Adapter]:
    from profit_ds.adapters.prompt import PROMPT
    return {PROMPT.name: PROMPT}


ADAPTERS = _registry()
