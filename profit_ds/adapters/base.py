"""The adapter protocol: what the federated code, the generation and the export need of an
adapter (`profit_ds/adapters/__init__.py` lists the adapters)."""
from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from profit_ds.fl.state import State
from profit_ds.model.prompted import TrainBatch

if TYPE_CHECKING:
    from profit_ds.memory import Dims
    from profit_ds.model.backbone import Backbone


class RowScope(Protocol):
    def set_rows(self, row_client: torch.Tensor) -> None:
        """From the next forward on, batch row r is client `row_client[r]`'s: generation
        drops its finished rows and brings in new ones."""


class Adapter(Protocol):
    name: str
    positions: int  # extra positions per row of this adapter's states, known before any bank

    def init(self, backbone: "Backbone", seed: int) -> State:
        """The initial global state (fp32, one row without the client axis); the same on
        every rank."""

    def floats(self, dims: "Dims") -> int:
        """The size of one client's state in floats, from the model's shape alone (the plan
        counts the bank, its gradient and Adam's moments)."""

    def check(self, model) -> None:
        """Refuse, as a usage error naming the flag, settings the loaded `model` cannot take
        (LoRA targets it does not have): before the budgets are sized from them."""

    def saved_bytes(self, dims: "Dims", b: int) -> tuple[int, int]:
        """What a training forward saves for the backward beyond the frozen backbone's own
        activations, in a dtype of `b` bytes: (bytes per position, bytes per row), over all
        layers (`memory.TokenCosts`; a prompt's positions are counted as positions)."""

    def extra_tokens(self, bank: State) -> int:
        """Positions the adapter adds to every row (P for a soft prompt, 0 for LoRA): the
        token budgets and the attention kernel choice count them."""

    def prefix(self, bank: State) -> torch.Tensor | None:
        """`[K, P, D]` embeddings to put before each row's tokens, or None."""

    def rows(self, model, bank: State, row_client: torch.Tensor) -> AbstractContextManager[RowScope]:
        """While in force, `model`'s forwards apply row r's client state
        `bank[row_client[r]]` wherever the adapter acts inside the backbone (LoRA's modules;
        nothing for a prompt, which enters as `prefix`). A backward that recomputes the
        forward (activation checkpointing) must run inside it too."""

    def loss_sums(self, model, bank: State, batch: TrainBatch,
                  checkpointing: bool = False) -> torch.Tensor:
        """`[K]` per-client sums of label-token cross-entropy, row r under its client's state
        `bank[batch.row_client[r]]`; the gradient flows back to `bank`'s leaves."""

    def trains(self, leaf: str) -> bool:
        """Whether leaf `leaf` is trained (FFA-LoRA freezes A at its init)."""

    def private(self, leaf: str) -> bool:
        """Whether a federated client keeps its own `leaf` between rounds instead of taking
        the global one (FedSA-LoRA's B); the server still averages it into the global state."""

    def describe(self, state: State) -> dict[str, str]:
        """What an output file of `state` records about the adapter (safetensors metadata)."""

    def export(self, state: State, base_model: str, out: Path) -> None:
        """Write the global `state` as a PEFT adapter folder that `PeftModel.from_pretrained`
        loads onto `base_model`."""
