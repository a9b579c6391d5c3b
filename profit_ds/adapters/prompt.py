"""Prompt tuning (Lester et al. 2021): a client's state is `{"prompt": [P, D]}`, P virtual
tokens prepended to every row. The batched forward with its shared prompt pass lives in
`model/prompted.py`; this module adapts it to the `Adapter` protocol."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from profit_ds.fl.state import State
from profit_ds.model.prompted import TrainBatch, client_loss_sums


@dataclass(frozen=True)
class PromptAdapter:
    name: str = "prompt"

    def extra_tokens(self, bank: State) -> int:
        return bank["prompt"].shape[-2]

    def loss_sums(self, model, bank: State, batch: TrainBatch,
                  checkpointing: bool = False) -> torch.Tensor:
        return client_loss_sums(model, bank["prompt"], batch, checkpointing)


PROMPT = PromptAdapter()
