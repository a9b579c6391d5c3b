"""What training and generation hold in memory per token, and the budgets a run takes from it.

One model of memory serves `profit-ds plan` (before anything is downloaded, for a GPU of a
given size) and a run (after its backbone is loaded, against the memory actually free), so the
plan and the run cannot disagree (tests/test_budgets.py checks llama-7b on one 80 GB GPU).

Per token of one rank's work, for a decoder of L layers, hidden size D, intermediate size I,
H attention heads, vocabulary V, in a dtype of b bytes:

  training     L x (8D + 3I) x b saved for the backward pass at every position (measured on a
               small Llama with frozen weights: tests/test_ops.py), plus with eager attention
               L x H x (4 + b) per (position, key) pair (the fp32 softmax and its cast, both
               saved) in forwards short enough to take it (`eager_up_to`); with activation
               checkpointing only each layer's input, L x D x b, plus one layer's full share
               while it is recomputed. At every label position the logits: V x (b + 12) (the
               logits, their fp32 copy, the saved log-softmax, one fp32 gradient). An
               adapter adds its own saved tensors (`Adapter.saved_bytes`: nothing for a
               prompt, whose positions count as positions; for LoRA each target's input and
               x A^T per position, and every row's gathered A and B).
  generation   the KV cache, L x 2 x kv_heads x head_dim x b per position of prompt, source
               and new tokens; the prefill's live tensors of one layer, (8D + 3I) x b per
               position (no grad: layers free theirs as they go); fp32 logits of the last
               position, 2V x 4 per row.

Budgets: a training forward takes rows (longest first) while their bytes fit the memory
budget and their padded tokens the throughput cap; K=auto is the number of clients whose
rows fill one such forward on every rank (more would only add forwards, fewer would waste
them); a generate call takes rows (longest first) up to its rows cap while their padded
positions fit the token cap and the memory (`call_rows`). The caps are where a larger batch
stops paying on each kind of device (measured on SmolLM2-135M on a CPU, docs/BENCHMARKS.md
"Budgets"): 64 rows is the fastest generate call there (256 is slower), and bounding a call
at 8,192 padded positions is 1.24x faster still and holds 0.3 GB less (long rows alone),
and 1,024 tokens per forward gets 85% of 2,048's training rate in 70% of its memory, on a
machine whose RAM is everyone's. The GPU caps are not measured yet.
"""
from __future__ import annotations

import ctypes
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from profit_ds.adapters.base import Adapter

GB = 10**9
BYTES = {"fp32": 4, "bf16": 2}
SAVED_PER_HIDDEN, SAVED_PER_INTERMEDIATE = 8, 3
LOGIT_EXTRA = 4 + 4 + 4  # fp32 copy, saved log-softmax, one fp32 gradient (per vocab entry)
# where a larger batch stops paying, per device kind (docs/BENCHMARKS.md, "Budgets")
TOKENS_PER_FORWARD_CAP = {"cpu": 1024, "cuda": 32768}
GENERATION_ROWS_CAP = {"cpu": 64, "cuda": 512}
# padded positions (prompt, source and new tokens) of one generate call per rank; None: the
# memory budget alone bounds them
GENERATION_TOKENS_CAP: dict[str, int | None] = {"cpu": 8192, "cuda": None}
# of the memory found free, what a run plans to use: the rest is for the allocator's
# fragmentation, the OS and other processes (a CPU's memory is shared)
FREE_FRACTION = {"cpu": 0.5, "cuda": 0.9}
CUDA_RESERVE = 1 * GB  # NCCL buffers, cuBLAS workspaces, the allocator's slack
SCORING_CALLS = 4  # generate calls' worth of rows a personalization group scores at once


@dataclass(frozen=True)
class Dims:
    """The sizes of a decoder that decide its memory per token."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Dims":
        """From a transformers config (Llama, Mistral, Qwen2 and most decoders name these so)."""
        heads = getattr(config, "num_attention_heads", None) or 1
        hidden = config.hidden_size
        return cls(layers=config.num_hidden_layers, hidden=hidden,
                   intermediate=getattr(config, "intermediate_size", None) or 4 * hidden,
                   heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=getattr(config, "head_dim", None) or hidden // heads,
                   vocab=config.vocab_size)


@dataclass(frozen=True)
class TokenCosts:
    """Bytes one rank holds per unit of work, for one backbone in one dtype."""

    train_token: int   # saved for backward at one position, all layers
    train_key: int     # eager attention: per (position, key) pair, all layers (0 otherwise)
    label: int         # logits and loss at one label position
    kv_token: int      # the KV cache of one position, all layers
    prefill_token: int  # a no-grad forward's live tensors at one position (one layer)
    row_logits: int    # a generated row's last-position logits
    eager_keys: int = 0  # the most keys a forward attends to with eager attention (`eager_up_to`)
    train_row: int = 0   # saved per row whatever its length (LoRA's gathered A and B)

    def train(self, rows: int, tokens: int, keys: int, labels: int) -> int:
        """One forward of `rows` rows padded to `tokens` positions, each attending to `keys`
        keys, with `labels` label positions in all."""
        return (rows * tokens * (self.train_token + self.key_bytes(keys)) + rows * self.train_row
                + labels * self.label)

    def key_bytes(self, keys: int) -> int:
        """Saved attention scores per position of a forward attending to `keys` keys: eager
        attention's up to `eager_keys`; beyond, that forward takes SDPA, which saves none."""
        return keys * self.train_key if keys <= self.eager_keys else 0

    def same_kernel(self, keys: int, other: int) -> bool:
        """Whether forwards attending to `keys` and to `other` keys take the same attention
        kernel (eager up to `eager_keys`, SDPA past it; one kernel without eager)."""
        return not self.eager_keys or (keys <= self.eager_keys) == (other <= self.eager_keys)

    def generate(self, rows: int, context: int, new_tokens: int) -> int:
        """One generate call of `rows` rows of `context` positions (prompt and source)."""
        return rows * ((context + new_tokens) * self.kv_token + context * self.prefill_token
                       + self.row_logits)

    @property
    def generated_position(self) -> int:
        """A bound on a generate call's bytes per padded position (`generate`: KV cache and
        prefill, counted for new tokens too)."""
        return self.kv_token + self.prefill_token


def token_costs(dims: Dims, dtype: str, eager_attention: bool = False,
                checkpointing: bool = False, adapter: "Adapter | None" = None) -> TokenCosts:
    """The per-token costs of a decoder in `dtype` (see the module docstring), with what
    `adapter` saves on top (`Adapter.saved_bytes`; with checkpointing, one layer's share)."""
    b = BYTES[dtype]
    layer = _layer_bytes(dims, b)
    key = dims.heads * (4 + b) if eager_attention else 0
    extra_token, extra_row = adapter.saved_bytes(dims, b) if adapter else (0, 0)
    if checkpointing:
        train_token, train_key = dims.layers * dims.hidden * b + layer, key
        extra_token, extra_row = extra_token // dims.layers, extra_row // dims.layers
    else:
        train_token, train_key = dims.layers * layer, dims.layers * key
    return TokenCosts(train_token=train_token + extra_token, train_key=train_key,
                      train_row=extra_row,
                      label=dims.vocab * (b + LOGIT_EXTRA),
                      kv_token=dims.layers * 2 * dims.kv_heads * dims.head_dim * b,
                      prefill_token=layer, row_logits=2 * dims.vocab * 4,
                      eager_keys=eager_up_to(dims, b) if eager_attention else 0)


def eager_up_to(dims: Dims, b: int) -> int:
    """The most keys a training forward attends to with eager attention, where the backbone
    trains with it (on a CPU, `backbone.attention_implementation`): while its saved
    scores, H x (4 + b) bytes per key, are no more than the layer's other saved activations
    per position, (8D + 3I) x b. Longer forwards take SDPA, whose flash kernel saves no
    scores and there is also the faster one (SmolLM2, bf16, forward and backward of one layer's
    attention: eager 195 ms against SDPA 97 ms for 1 row of 1,172 keys, 18 against 63 ms for
    5 rows of 200): SmolLM2 switches at 341 keys, where eager's scores of a 1,172-token row
    would have been 2.2 GB."""
    return _layer_bytes(dims, b) // (dims.heads * (4 + b))


def _layer_bytes(dims: Dims, b: int) -> int:
    """What one layer saves for the backward pass at one position, eager scores aside."""
    return (SAVED_PER_HIDDEN * dims.hidden + SAVED_PER_INTERMEDIATE * dims.intermediate) * b


@dataclass(frozen=True)
class ForwardLimit:
    """How much one training forward may hold on one rank."""

    costs: TokenCosts
    memory: int       # bytes
    max_tokens: int   # padded row tokens (the throughput cap)

    def fits(self, rows: int, longest: int, prompt_tokens: int, labels: int) -> bool:
        """Whether `rows` rows padded to `longest` tokens (after a prompt of `prompt_tokens`,
        computed once per client) with `labels` label tokens fit this forward."""
        return (rows * longest <= self.max_tokens and
                self.costs.train(rows, longest, prompt_tokens + longest, labels) <= self.memory)


@dataclass(frozen=True)
class Budgets:
    """A run's budgets per rank, and what they rest on (results.json records them)."""

    memory: int                 # bytes for activations, caches and batches
    memory_source: str          # where `memory` came from
    tokens_per_forward: int     # padded row tokens of one training forward (longest rows)
    clients_in_parallel: int    # K=auto
    generation_rows: int        # rows per generate call, at most
    generation_tokens: int      # padded positions per generate call, at most
    checkpointing: bool
    forward: ForwardLimit
    k_fixed: bool = False       # K set by the user (--clients-in-parallel N), not K=auto

    def personalization_group(self, rows_per_pair: float, pairs: int) -> int:
        """How many (client, lr) pairs to personalize together.

        K=auto is sized by training forwards, where one client's rows may fill one (SmolLM2
        on a CPU: K=1); scoring one pair's local and global sets alone would then leave most
        of each generate call's rows empty, and one pair's rows span every source length, so
        each call pads to its longest. Under K=auto a group also takes enough pairs to fill
        SCORING_CALLS generate calls, whose rows, sorted by length, pad little (measured on
        SmolLM2: 3.4 examples/s over 8 prompts' global test sets in 64-row calls, 1.5 for
        one pair at a time); training still runs in forwards of the forward budget, and a
        group is what a checkpoint keeps, so a kill loses at most one. A user's K is taken
        as it is."""
        k = self.clients_in_parallel
        if not self.k_fixed:
            rows = SCORING_CALLS * self.generation_rows
            k = max(k, math.ceil(rows / max(1.0, rows_per_pair)))
        return max(1, min(k, pairs))

    def to_dict(self) -> dict:
        return {"memory_gb": self.memory / GB, "memory_source": self.memory_source,
                "tokens_per_forward": self.tokens_per_forward,
                "clients_in_parallel": self.clients_in_parallel,
                "generation_rows": self.generation_rows,
                "generation_tokens": self.generation_tokens,
                "activation_checkpointing": self.checkpointing}


@dataclass(frozen=True)
class WorkShape:
    """What sizes a run's budgets: its rows, prompt and generation lengths."""

    batch_size: int         # rows per client per step
    mean_row: float         # mean source + target tokens of a training row
    longest_row: int        # the longest training row
    label_share: float      # the largest share of a row's tokens that are labels
    prompt_tokens: int
    longest_context: int    # prompt + the longest source scored
    new_tokens: int
    world: int


def tokens_fitting(costs: TokenCosts, memory: int, work: WorkShape) -> int:
    """The most padded tokens of the longest rows that one forward fits in `memory`."""
    keys = work.prompt_tokens + work.longest_row
    per_token = costs.train_token + costs.key_bytes(keys) + work.label_share * costs.label
    return int(memory // per_token) if per_token else 0


def budgets(dims: Dims, dtype: str, eager_attention: bool, memory: int, device: str,
            work: WorkShape, checkpointing: str = "auto", memory_source: str = "",
            generation_rows: int | None = None, adapter: "Adapter | None" = None) -> Budgets:
    """The run's budgets on one rank of `device` ("cpu" or "cuda") with `memory` bytes.

    checkpointing: "on", "off", or "auto": on only when one longest row does not fit without
    it (it recomputes every layer in the backward pass, about a third more compute).
    generation_rows: the user's cap on rows per generate call (`--eval-batch-size`), else
    the device's; a call's padded positions are capped by the device's token cap and the
    memory, so that every call fits it (`call_rows`).
    adapter: the run's adapter, whose own saved tensors the training forwards count.
    """
    plain = token_costs(dims, dtype, eager_attention, adapter=adapter)
    ckpt = token_costs(dims, dtype, eager_attention, checkpointing=True, adapter=adapter)
    use = {"on": True, "off": False}.get(
        checkpointing, tokens_fitting(plain, memory, work) < work.longest_row)
    costs = ckpt if use else plain
    cap = TOKENS_PER_FORWARD_CAP[device]
    tokens = min(cap, tokens_fitting(costs, memory, work))
    k = max(1, int(max(tokens, work.longest_row) * work.world
                   // (work.batch_size * max(1.0, work.mean_row))))
    per_position, per_row = costs.generated_position, costs.row_logits
    rows = max(1, min(generation_rows or GENERATION_ROWS_CAP[device],
                      memory // (per_row + per_position)))
    positions = min(GENERATION_TOKENS_CAP[device] or memory,
                    max(0, memory - rows * per_row) // per_position)
    return Budgets(memory=memory, memory_source=memory_source,
                   tokens_per_forward=max(tokens, work.longest_row), clients_in_parallel=k,
                   generation_rows=rows, checkpointing=use,
                   generation_tokens=positions,
                   forward=ForwardLimit(costs, memory, max(tokens, work.longest_row)))


def call_rows(rows: int, tokens: int | None, positions: int) -> int:
    """Rows of one generate call whose rows pad to `positions` (prompt, source and new
    tokens), within `rows` rows and `tokens` padded positions (None: rows alone); one row at
    the least, however long."""
    return rows if tokens is None else max(1, min(rows, tokens // positions))


MMAP_THRESHOLD = 4 * 2**20  # bytes; glibc's M_MMAP_THRESHOLD
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
ONEDNN_PRIMITIVES = 8  # matmul primitives oneDNN keeps (its default: 1,024)


def release_freed_memory() -> None:
    """Hand the heap pages freed tensors left back to the OS (glibc's `malloc_trim`).

    glibc keeps freed pages for reuse, and a phase of other shapes (generation's KV caches
    after training's saved activations, a longer batch after a shorter) takes new ones: a
    SmolLM2 run whose phases each peaked below 3.7 GB reached 6.0 GB of RSS on a CPU. Called
    after each generate call and each local training; a no-op where there is no glibc."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def bound_native_caches() -> bool:
    """Keep native allocators from holding memory a run no longer uses; call before torch
    computes anything. True if glibc's threshold took (tested; a no-op without glibc).

    glibc: serve every allocation of `MMAP_THRESHOLD` or more from its own mapping, returned
    to the OS when freed (`mallopt(M_MMAP_THRESHOLD)`). Its default threshold starts at 128 KB
    and rises to the size of each large block freed, up to 32 MB, so a training forward's
    saved activations (a few MB each) soon come from the heap, whose freed pages stay in the
    process between forwards: a short SmolLM2 run peaked at 3.66 GB with the default and
    3.23 GB with 4 MB, in the same time; 256 KB held less still but ran training 2.5x slower,
    a page fault on every mid-sized tensor (docs/BENCHMARKS.md).

    oneDNN (PyTorch's CPU matmuls in bf16) keeps up to 1,024 primitives, one per matmul shape
    met, each with memory of its own; training's rows come in ever new lengths, so on SmolLM2
    that held 0.45 GB more after 8 training steps, and a step peaked 0.55 GB higher, than with
    `ONEDNN_PRIMITIVE_CACHE_CAPACITY` = `ONEDNN_PRIMITIVES` (in the same time). A user's own
    setting of that variable wins."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVES))
    libc = _libc()
    return bool(libc) and libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1


def _libc():
    """glibc, or False where there is none (musl, macOS)."""
    global _LIBC
    if _LIBC is None:
        try:
            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


_LIBC = None


def free_memory(device: str, budget_gb: float | None = None) -> tuple[int, str]:
    """Bytes a rank may plan to use now, and a note of where the figure came from.

    `budget_gb` (`--memory-budget`) wins. Otherwise a share of what is free: on a GPU,
    `torch.cuda.mem_get_info` less a reserve; on a CPU, the kernel's MemAvailable shared by the
    ranks on this machine.
    """
    if budget_gb is not None:
        return int(budget_gb * GB), f"--memory-budget {budget_gb:g}"
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return usable_gpu_memory(free), (f"{FREE_FRACTION['cuda']:.0%} of the GPU's free "
                                         f"{free / GB:.1f} GB less {CUDA_RESERVE / GB:g} GB")
    available = _mem_available()
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    share = int(FREE_FRACTION["cpu"] * available / ranks)
    return share, (f"{FREE_FRACTION['cpu']:.0%} of the available {available / GB:.1f} GB RAM"
                   + (f" / {ranks} ranks" if ranks > 1 else ""))


def usable_gpu_memory(free: int) -> int:
    """Of `free` bytes on a GPU, what a run plans to use (`profit-ds plan` asks the same)."""
    return max(0, int(FREE_FRACTION["cuda"] * free) - CUDA_RESERVE)


def _mem_available() -> int:
    """The kernel's estimate of memory available to new work (MemAvailable)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def work_shape(train_rows: Sequence[tuple[int, int]], eval_sources: Sequence[int],
               batch_size: int, prompt_tokens: int, new_tokens: int, world: int) -> WorkShape:
    """A WorkShape from the data: (source, target) token counts of every training row and the
    source token counts of every scored example."""
    lengths = [s + t for s, t in train_rows] or [1]
    shares = [t / (s + t) for s, t in train_rows if s + t] or [1.0]
    return WorkShape(batch_size=batch_size, mean_row=sum(lengths) / len(lengths),
                     longest_row=max(lengths), label_share=max(shares),
                     prompt_tokens=prompt_tokens,
                     longest_context=prompt_tokens + max(eval_sources, default=1),
                     new_tokens=new_tokens, world=world)
