"""LoRA (Hu et al. 2021), every row with its own client's adapter, in one backbone pass.

A client's state holds, per target module (a linear layer of the frozen backbone, e.g. every
layer's `q_proj` and `v_proj`), `<module>.lora_A [r, d_in]` and `<module>.lora_B [d_out, r]`;
the module's output becomes W x + (alpha / r) B A x. In a bank each leaf has a leading client
axis, and a batch mixes rows of many clients: a forward hook on each target module gathers
every row's A and B (`index_select` on the row's client, the determinism rule of
`model/prompted.py`) and adds the per-row low-rank term with two batched matrix products. The
backbone's own weights are never touched, so this works on a ZeRO-3 partitioned model (the
hook needs only the module's input and output) and one loaded backbone serves every client.
PEFT's mixed-adapter batches (`adapter_names=`) are inference-only and loop over sub-batches;
this is one pass for training and generation alike.

The low-rank term is computed in the backbone's dtype, as a prompt enters it (the fp32 master
state is cast per row): PEFT casts the module's input to the adapter's fp32 instead, which in
bf16 keeps an fp32 copy of every target module's input for the backward (for llama-7b with
q_proj and v_proj, 1 MB per token, a quarter more activations); here the input the base layer
saves anyway is the one saved. In fp32 the two are the same computation (tested against
PEFT). Init as PEFT's default: A Kaiming-uniform with a = sqrt(5), B = 0, so a fresh adapter
is the bare backbone.

Aggregation (`--lora-aggregation`) is what the federated side does with A and B:
- `fedit`: both trained and averaged, as the peers (OpenFedLLM, FederatedScope-LLM) do; the
  mean of the products B_k A_k is not the product of the means, so the average is inexact;
- `ffa` (FFA-LoRA, Sun et al. 2024): A frozen at its shared init, only B trained and averaged;
  the product is linear in B, so the average is exact (`trains`);
- `fedsa` (FedSA-LoRA, Guo et al. 2025): A trained and shared; each client's B stays with the
  client between rounds (`private`, kept by `fl/rounds.py`).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

from profit_ds.errors import UsageError
from profit_ds.fl.state import State, num_rows
from profit_ds.memory import Dims
from profit_ds.model.prompted import TrainBatch, checkpointed, label_loss_sums, model_device

if TYPE_CHECKING:
    from profit_ds.config import RunConfig
    from profit_ds.model.backbone import Backbone

AGGREGATIONS = ("fedit", "ffa", "fedsa")
A, B = ".lora_A", ".lora_B"
# targets that read the same tensor in a Llama decoder layer (its saved input counts once)
_INPUT_OF = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
_SAVED_ALREADY = {"o_proj"}  # its input, the attention output, is saved by SDPA's backward


def target_shape(dims: Dims, target: str) -> tuple[int, int]:
    """(d_in, d_out) of a Llama-style decoder's linear layer `target`, from its config alone:
    what `profit-ds plan` counts before any weight is read."""
    q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    shapes = {"q_proj": (dims.hidden, q), "k_proj": (dims.hidden, kv),
              "v_proj": (dims.hidden, kv), "o_proj": (q, dims.hidden),
              "gate_proj": (dims.hidden, dims.intermediate),
              "up_proj": (dims.hidden, dims.intermediate),
              "down_proj": (dims.intermediate, dims.hidden)}
    if target not in shapes:
        raise UsageError(f"--lora-targets: {target} is not one of a Llama decoder's linear "
                         f"layers ({', '.join(shapes)})")
    return shapes[target]


class _Scope:
    """The bank and the row -> client map the hooks read during a forward."""

    def __init__(self, bank: State, row_client: torch.Tensor, scaling: float) -> None:
        self.bank, self.row_client, self.scaling = bank, row_client, scaling

    def set_rows(self, row_client: torch.Tensor) -> None:
        self.row_client = row_client.to(self.row_client.device)


class _Slot:
    """Per model: the scope in force (None: the bare backbone), the modules hooked and the
    target lists they were found for (so a forward does not walk the module tree again)."""

    def __init__(self) -> None:
        self.scope: _Scope | None = None
        self.hooked: set[str] = set()
        self.found_for: set[tuple[str, ...]] = set()


def _slot(model) -> _Slot:
    if not hasattr(model, "_profit_ds_lora"):
        model._profit_ds_lora = _Slot()
    return model._profit_ds_lora


def _hook(slot: _Slot, name: str):
    """The forward hook of module `name`: out + scaling * B_r A_r x_r for each row r."""
    def add_low_rank(module, args, out):
        scope = slot.scope
        if scope is None or name + A not in scope.bank:
            return None
        x = args[0]
        a = scope.bank[name + A].index_select(0, scope.row_client).to(x.dtype)
        b = scope.bank[name + B].index_select(0, scope.row_client).to(x.dtype)
        return out + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scope.scaling
    return add_low_rank


@dataclass(frozen=True)
class LoraAdapter:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    aggregation: str = "fedit"
    name: str = "lora"

    @classmethod
    def from_config(cls, cfg: "RunConfig") -> "LoraAdapter":
        return cls(cfg.lora_rank, cfg.lora_alpha,
                   tuple(t.strip() for t in cfg.lora_targets.split(",")), cfg.lora_aggregation)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def modules(self, model) -> dict[str, torch.nn.Linear]:
        """The target modules by name: linear layers whose last name part is a target."""
        found = {name: m for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in self.targets
                 and m is not model.get_output_embeddings()}
        missing = set(self.targets) - {n.rsplit(".", 1)[-1] for n in found}
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear)})
            raise UsageError(f"--lora-targets {','.join(self.targets)}: the model has no "
                             f"linear layer named {sorted(missing)[0]} (it has "
                             f"{', '.join(linear)})")
        return found

    def init(self, backbone: "Backbone", seed: int) -> State:
        """PEFT's default init, from `seed` on every rank alike (module order is fixed)."""
        gen = torch.Generator().manual_seed(seed)
        state: State = {}
        for name, m in self.modules(backbone.model).items():
            a = torch.empty(self.rank, m.in_features)
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            state[name + A] = a
            state[name + B] = torch.zeros(m.out_features, self.rank)
        return state

    positions = 0  # no extra positions in a row

    def floats(self, dims: Dims) -> int:
        """A client state's size in floats: r (d_in + d_out) per target module per layer."""
        return dims.layers * sum(self.rank * sum(target_shape(dims, t)) for t in self.targets)

    def check(self, model) -> None:
        """Every target names a linear layer of `model` (`modules` says which it has)."""
        self.modules(model)

    def saved_bytes(self, dims: Dims, b: int) -> tuple[int, int]:
        """Per layer, the hook's two products save: each distinct target input x (d_in per
        position; q/k/v share one, as gate/up do; the frozen linear saves none of its own;
        o_proj's is SDPA's output, which SDPA saves already), x A^T (r per position per
        target), and the gathered A and B of every row (r (d_in + d_out) per target).
        tests/test_ops.py checks it against autograd."""
        inputs = {_INPUT_OF.get(t, t): target_shape(dims, t)[0] for t in self.targets
                  if t not in _SAVED_ALREADY}
        per_position = sum(inputs.values()) + self.rank * len(self.targets)
        per_row = sum(self.rank * sum(target_shape(dims, t)) for t in self.targets)
        return dims.layers * per_position * b, dims.layers * per_row * b

    def extra_tokens(self, bank: State) -> int:
        return 0

    def prefix(self, bank: State) -> torch.Tensor | None:
        return None

    @contextmanager
    def rows(self, model, bank: State, row_client: torch.Tensor) -> Iterator[_Scope]:
        slot = _slot(model)
        if self.targets not in slot.found_for:
            for name, module in self.modules(model).items():
                if name not in slot.hooked:
                    module.register_forward_hook(_hook(slot, name))
                    slot.hooked.add(name)
            slot.found_for.add(self.targets)
        was = slot.scope
        device = model_device(model)
        slot.scope = _Scope({n: t.to(device) for n, t in bank.items()}, row_client.to(device),
                            self.scaling)
        try:
            yield slot.scope
        finally:
            slot.scope = was

    def loss_sums(self, model, bank: State, batch: TrainBatch,
                  checkpointing: bool = False) -> torch.Tensor:
        """The plain forward of every row (no extra positions) under its client's adapter.

        With activation checkpointing (reentrant) a layer's recompute passes gradients only
        to inputs that need them; the frozen embeddings do not, so they are made a leaf that
        does, or no gradient would reach the layers' adapters."""
        batch = batch.to(model_device(model))
        with self.rows(model, bank, batch.row_client):
            embeds = model.get_input_embeddings()(batch.input_ids)
            if checkpointing:
                with checkpointed(model):
                    hidden = model.base_model(inputs_embeds=embeds.detach().requires_grad_(True),
                                              attention_mask=batch.attention_mask,
                                              use_cache=False).last_hidden_state
            else:
                hidden = model.base_model(inputs_embeds=embeds,
                                          attention_mask=batch.attention_mask,
                                          use_cache=False).last_hidden_state
            return label_loss_sums(model, hidden, batch, num_rows(bank))

    def trains(self, leaf: str) -> bool:
        return not (self.aggregation == "ffa" and leaf.endswith(A))

    def private(self, leaf: str) -> bool:
        """Whether a client keeps its own copy of `leaf` between rounds (FedSA's B)."""
        return self.aggregation == "fedsa" and leaf.endswith(B)

    def describe(self, state: State) -> dict[str, str]:
        return {"adapter": self.name, "lora_rank": str(self.rank), "lora_alpha": f"{self.alpha:g}",
                "lora_targets": ",".join(self.targets), "lora_aggregation": self.aggregation}

    def export(self, state: State, base_model: str, out: Path) -> None:
        """A PEFT LoRA adapter: its config and `base_model.model.<module>.lora_A.weight` /
        `lora_B.weight`, PEFT's own key names."""
        from peft import LoraConfig, TaskType
        from safetensors.torch import save_file

        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=self.rank, lora_alpha=self.alpha,
                            target_modules=list(self.targets), lora_dropout=0.0, bias="none",
                            base_model_name_or_path=base_model)
        out.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(out)
        save_file({f"base_model.model.{leaf}.weight": t.float().contiguous()
                   for leaf, t in state.items()}, out / "adapter_model.safetensors")


ADAPTER = LoraAdapter
