"""Load a causal LM once, freeze it, and hand it to DeepSpeed ZeRO-3 with no optimizer.

DeepSpeed partitions the frozen weights across ranks and gathers each layer on the fly in
forward and backward (DESIGN.md point 1). The config is registered with `HfDeepSpeedConfig`
*before* `from_pretrained`, so transformers builds the model inside `deepspeed.zero.Init`:
a 7B backbone is partitioned while loading, never materialized whole on one rank.

One rank that holds the whole model (no parameter offload) has nothing to partition; there
ZeRO-3 would only add its per-module hooks, so the plain model runs (measured in
docs/BENCHMARKS.md: a round 1.15-1.9x faster on this CPU).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from profit_ds import distributed
from profit_ds.errors import UsageError
from profit_ds.memory import (TOKENS_PER_FORWARD_CAP, Dims, ForwardLimit, free_memory,
                              token_costs)
from profit_ds.model.aliases import gated_hint, resolve_model
from profit_ds.model.ds_config import (import_deepspeed, load_ds_config, offloads_params,
                                       uses_zero3, without_zero_init)
from profit_ds.model.gguf import hf_folder
from profit_ds.model.zero3_order import sum_like_zero3

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Backbone:
    """The frozen model (ZeRO-3 shards and hooks installed by DeepSpeed, or whole on one
    rank) and its tokenizer."""

    model: torch.nn.Module
    engine: object  # DeepSpeed's engine; None for a whole model on one rank
    tokenizer: object
    name: str
    dtype: torch.dtype
    hf_ds_config: object = None  # keeps transformers' ZeRO-3 awareness (synced generation) alive
    # what one training forward may hold on this rank: the run sets it from its budgets
    # (profit_ds.memory); unset, `forward_limit()` derives it from the memory free now
    limit: ForwardLimit | None = None
    checkpointing: bool = False  # activation checkpointing in training forwards (the budgets')

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def eager_attention(self) -> bool:
        return self.model.config._attn_implementation == "eager"

    @contextlib.contextmanager
    def attention(self, kind: str) -> Iterator[None]:
        """Run with attention kernel `kind` ("sdpa", "eager") for a while: generation takes
        SDPA even where training takes eager (`attention_implementation`)."""
        was = self.model.config._attn_implementation
        if was != kind:
            self.model.set_attn_implementation(kind)
        try:
            yield
        finally:
            if was != kind:
                self.model.set_attn_implementation(was)

    def training_attention(self, keys: int) -> contextlib.AbstractContextManager:
        """The attention kernel of a training forward attending to `keys` keys: the one the
        backbone was loaded with, except that eager gives way to SDPA past the limit's
        `eager_keys` (`memory.eager_up_to`: less memory, and faster there)."""
        if self.eager_attention and keys > self.forward_limit().costs.eager_keys:
            return self.attention("sdpa")
        return contextlib.nullcontext()

    def forward_limit(self) -> ForwardLimit:
        """The run's limit, or one from the memory free on this device now."""
        if self.limit is None:
            device = distributed.device().type
            memory, _ = free_memory(device)
            costs = token_costs(Dims.of(self.model.config), self.dtype_name,
                                self.eager_attention)
            self.limit = ForwardLimit(costs, memory, TOKENS_PER_FORWARD_CAP[device])
        return self.limit

    def resident_parameter_bytes(self) -> int:
        """Bytes of backbone parameters this rank holds between forwards (its ZeRO-3 shard)."""
        return sum(p.ds_tensor.numel() * p.ds_tensor.element_size()
                   if hasattr(p, "ds_tensor") else p.numel() * p.element_size()
                   for p in self.model.parameters())


def resolve_path(name: str) -> str:
    """What `from_pretrained` loads for `--model`: built-in, alias, local path or hub id; a
    GGUF file (`--model FILE.gguf`, or an alias's packaged one) is first converted, once, into
    a cached folder (`profit_ds.model.gguf`). Checking a name without loading it:
    `aliases.resolve_model`."""
    ref = resolve_model(name)
    if ref.kind == "gguf":
        quiet = not distributed.is_main()
        return str(hf_folder(Path(ref.location), say=(lambda line: None) if quiet else None))
    return ref.location


def attention_implementation(dtype: str) -> str | None:
    """"eager" on a CPU, else None (transformers' default, SDPA).

    PyTorch's CPU flash-attention kernel, which SDPA picks, is slow in bf16: at a training
    step's shape (96 rows, 8 heads, 45 queries, 65 keys) its forward and backward took 93 ms
    against 20 ms for eager attention's plain matmuls and softmax (docs/BENCHMARKS.md). In fp32
    the two are on par in speed, but only eager gives a row the same numbers however far its
    batch pads it (masked keys add exact zeros; SDPA's CPU kernel differed by up to 1e-5
    between paddings of 33 and 40 on the built-in model), which is what makes a client's
    gradient independent of its batch mates bit for bit (`fl/gradients.py`).
    """
    return "eager" if distributed.device().type == "cpu" else None


def load_config_and_tokenizer(name: str, trust_remote_code: bool = False,
                              local_files_only: bool = False,
                              path: str | None = None) -> tuple[object, object]:
    """The model's config and tokenizer (a pad token set), without its weights: all that the
    checks of a run's settings need (`runner.check_fits`), a few kilobytes to fetch where the
    weights are gigabytes. `local_files_only`: no download (a hub model must be cached).
    `path`: `resolve_path(name)` when the caller has it already."""
    from transformers import AutoConfig, AutoTokenizer

    path = path or resolve_path(name)
    options = dict(trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    with _load_errors(name, path):
        tokenizer = AutoTokenizer.from_pretrained(path, **options)
        config = AutoConfig.from_pretrained(path, **options)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return config, tokenizer


def load_backbone(name: str, dtype: str = "fp32", ds_config: str | None = None,
                  trust_remote_code: bool = False, zero3: bool | None = None,
                  check: Callable[[object, object], None] | None = None) -> Backbone:
    """Load, freeze and (with ZeRO-3) shard the backbone; same call on every rank.

    `ds_config`: a ZeRO-3 JSON file or bundled config name (None: the default for `dtype`);
    read and checked even when one rank runs the model whole, so a bad file fails the same way.
    `zero3`: wrap in ZeRO-3; None: where it does something, with several ranks or a config that
    offloads parameters (tests force it on to check ZeRO-3 against a plain model).
    `check(model_config, tokenizer)`: called before the weights load, so that settings the
    model cannot run (`runner.check_fits`) fail before a download of many gigabytes.
    """
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    path = resolve_path(name)
    distributed.setup()
    config = load_ds_config(ds_config, dtype=dtype, micro_batch=1)
    if zero3 is None:
        zero3 = uses_zero3(distributed.world(), offloads_params(config))
    model_config, tokenizer = load_config_and_tokenizer(name, trust_remote_code, path=path)
    if check:
        check(model_config, tokenizer)
    # registered, the config makes from_pretrained build inside zero.Init; a whole model must
    # not see another backbone's registration either (tests load several in one process)
    hf_ds_config = HfDeepSpeedConfig(config) if zero3 else None
    with (contextlib.nullcontext() if zero3 else without_zero_init(), _quiet_loading(),
          _load_errors(name, path)):
        model = AutoModelForCausalLM.from_pretrained(
            path, config=model_config, dtype=DTYPES[dtype],
            attn_implementation=attention_implementation(dtype),
            trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    model.get_output_embeddings().register_forward_pre_hook(_contiguous_input)
    if not zero3:
        sum_like_zero3(model)  # the bits of a ZeRO-3 run on several ranks
        return Backbone(model=model.to(distributed.device()).eval(), engine=None,
                        tokenizer=tokenizer, name=name, dtype=DTYPES[dtype])
    engine = import_deepspeed().initialize(model=model, config=config)[0]
    engine.eval()
    return Backbone(model=engine.module, engine=engine, tokenizer=tokenizer, name=name,
                    dtype=DTYPES[dtype], hf_ds_config=hf_ds_config)


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    """The LM head's input made contiguous. `generate`'s prefill computes logits for the last
    position only, `lm_head(hidden[:, -1:, :])`, a strided view; PyTorch's CPU matmul then
    expands the head's weight once per row into a batched matmul: for SmolLM2 (49k x 576) and
    16 rows, a 900 MB copy that took half of the prefill's time (measured, bf16). A copy of
    the small input avoids it; contiguous inputs (training, decoding steps) pass unchanged."""
    return (args[0].contiguous(), *args[1:])


@contextlib.contextmanager
def _load_errors(name: str, path: str):
    """A model that cannot be fetched or read is a usage error naming `--model`: with a login
    hint for a gated hub model; for weights stored as a pickle, which torch refuses to
    unpickle beyond plain tensors (`weights_only`: none of the file's code ran); for a model
    whose repository ships its own code, which runs only with --trust-remote-code."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError:
        raise UsageError(f"--model {name}: its weights are a pickle holding more than tensors, "
                         "which torch refuses to load (weights_only; none of its code ran); "
                         "use a safetensors copy of the model") from None
    except ValueError as err:  # transformers' word for a folder it cannot make a model of
        if "trust_remote_code" in str(err):
            raise UsageError(f"--model {name}: the model's repository runs its own code; pass "
                             "--trust-remote-code if you trust it") from None
        raise UsageError(f"--model {name}: cannot load ({str(err).splitlines()[0]})") from None
    except OSError as err:
        hint = gated_hint(path, err)
        raise UsageError(hint or f"--model {name}: cannot load ({str(err).splitlines()[0]})"
                         ) from None


@contextlib.contextmanager
def _quiet_loading():
    """No transformers "Loading weights" bar, but the hub's download bars as they were.

    A run reports its own phases, and its output stays the same at one rank and at several
    (under ZeRO-3, transformers loads through another path without that bar). A first
    download of a 7B backbone keeps its progress bar.
    """
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hub_was_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # transformers' own bars, and the hub's too ...
    if not hub_was_disabled:
        hub_utils.enable_progress_bars()  # ... which downloads keep
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if hub_was_disabled:
            hub_utils.disable_progress_bars()


def init_prompt(backbone: Backbone, num_tokens: int, mode: str, seed: int,
                text: str = "") -> torch.Tensor:
    """The initial soft prompt `[P, D]` in fp32 (the master copy; the backbone may be bf16).

    "vocab": embeddings of P tokens sampled from the vocabulary (special tokens excluded), as
    Lester et al. found works best for T5; "text": the embeddings of `text`'s tokens, repeated
    or cut to P (PEFT's TEXT init): a pretrained model reads them as words, so the prompt
    starts from where the bare backbone is (measured on SmolLM2, docs/REAL_MODEL.md, where
    random vocabulary tokens lowered global ROUGE-L); "random": Gaussian with the embedding
    matrix's std. Every rank gathers the (possibly partitioned) embedding and draws the same.
    """
    weight = backbone.model.get_input_embeddings().weight
    with import_deepspeed().zero.GatheredParameters([weight]):
        table = weight.detach().float().cpu().clone()
    gen = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn(num_tokens, table.shape[1], generator=gen) * table.std()
    if mode == "text":
        ids = backbone.tokenizer(text, add_special_tokens=False)["input_ids"]
        return table[torch.tensor((ids * (num_tokens // len(ids) + 1))[:num_tokens])].clone()
    special = set(backbone.tokenizer.all_special_ids)
    ordinary = torch.tensor([i for i in range(table.shape[0]) if i not in special])
    picks = ordinary[torch.randint(len(ordinary), (num_tokens,), generator=gen)]
    return table[picks].clone()
