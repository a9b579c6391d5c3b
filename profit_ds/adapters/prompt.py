"""Prompt tuning (Lester et al. 2021): a client's state is `{"prompt": [P, D]}`, P virtual
tokens prepended to every row. The batched forward with its shared prompt pass lives in
`model/prompted.py`; this module adapts it to the `Adapter` protocol."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import save_file

from profit_ds.fl.state import State
from profit_ds.model.prompted import TrainBatch, client_loss_sums

if TYPE_CHECKING:
    from profit_ds.config import RunConfig
    from profit_ds.memory import Dims
    from profit_ds.model.backbone import Backbone


class _NoScope:
    """A prompt acts only through its prefix: nothing inside the backbone follows the rows."""

    def set_rows(self, row_client: torch.Tensor) -> None:
        pass


@dataclass(frozen=True)
class PromptAdapter:
    tokens: int = 20
    init_mode: str = "vocab"
    init_text: str = ""
    name: str = "prompt"

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "PromptAdapter":
        return cls(cfg.prompt_tokens, cfg.prompt_init, cfg.prompt_init_text)

    def init(self, backbone: "Backbone", seed: int) -> State:
        from profit_ds.model.backbone import init_prompt
        return {"prompt": init_prompt(backbone, self.tokens, self.init_mode, seed,
                                      self.init_text)}

    @property
    def positions(self) -> int:
        """The positions a row of this run gets (extra_tokens of its banks)."""
        return self.tokens

    def floats(self, dims: "Dims") -> int:
        """A client state's size in floats: P x D."""
        return self.tokens * dims.hidden

    def check(self, model) -> None:
        """Any decoder takes a prompt."""

    def saved_bytes(self, dims: "Dims", b: int) -> tuple[int, int]:
        """Nothing beyond its P positions, which the backbone's per-position rule counts."""
        return 0, 0

    def extra_tokens(self, bank: State) -> int:
        return bank["prompt"].shape[-2]

    def prefix(self, bank: State) -> torch.Tensor | None:
        return bank["prompt"]

    @contextmanager
    def rows(self, model, bank: State, row_client: torch.Tensor) -> Iterator[_NoScope]:
        yield _NoScope()

    def loss_sums(self, model, bank: State, batch: TrainBatch,
                  checkpointing: bool = False) -> torch.Tensor:
        return client_loss_sums(model, bank["prompt"], batch, checkpointing)

    def trains(self, leaf: str) -> bool:
        return True

    def private(self, leaf: str) -> bool:
        return False

    def describe(self, state: State) -> dict[str, str]:
        return {"adapter": self.name, "prompt_tokens": str(state["prompt"].shape[-2])}

    def export(self, state: State, base_model: str, out: Path) -> None:
        """A PEFT PromptTuning adapter holding `prompt_embeddings` [P, D]."""
        from peft import PromptTuningConfig, TaskType

        prompt = state["prompt"]
        config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM,
                                    num_virtual_tokens=prompt.shape[0], token_dim=prompt.shape[1],
                                    num_transformer_submodules=1,
                                    base_model_name_or_path=base_model)
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        save_file({"prompt_embeddings": prompt.float().contiguous()},
                  out / "adapter_model.safetensors")


PROMPT = PromptAdapter()
ADAPTER = PromptAdapter
