"""Per-GPU memory of a run on a frozen ZeRO-3 backbone, before anything is downloaded: the
budgets (tokens per forward, clients in parallel, generation rows) a run would take on such a
GPU, and the parameter offload it needs.

The model's shape comes from its config alone (alias table, local config.json, or the hub's
config.json): the architecture is instantiated on the meta device, which allocates nothing but
gives the exact parameter count and sizes. Terms, in bytes per GPU, for a bf16 backbone of N
parameters on G = gpus x nodes GPUs (docs/GPU.md explains each):

  weights      2N/G: this GPU's ZeRO-3 shard (the whole model at one GPU without offload);
               0 with parameter offload (shard in pinned CPU RAM).
  gathered     2 x max(largest module, min(stage3_max_live_parameters, decoder layer +
               stage3_prefetch_bucket_size)): ZeRO-3 all-gathers a layer just before it runs,
               prefetches the next ones and frees them after use; plus parameters of at most
               stage3_param_persistence_threshold elements, which stay whole on every GPU.
  activations  the larger of one training forward and one generation batch, sized as the run
               sizes them (profit_ds.memory, the same code): the memory a run finds free on
               this GPU after loading (90% of it, less 1 GB) minus the gathered window is its
               budget; a forward takes rows up to that budget or the GPU's throughput cap.
  states       K x (a client state's floats) fp32 x 4: the bank (prompts: P x D each; LoRA:
               r (d_in + d_out) per target module and layer), its gradient and Adam's two
               moments.
  runtime      the CUDA context (1 GB, assumed) and the 1 GB the run keeps in reserve.

DeepSpeed's own estimator is reported alongside as a cross-check of the weights + gathered
terms (it assumes an optimizer; only its parameter part applies here).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from profit_ds.config import build
from profit_ds.errors import UsageError
from profit_ds.memory import (CUDA_RESERVE, GB, Budgets, Dims, WorkShape, budgets, call_rows,
                              token_costs, usable_gpu_memory)
from profit_ds.model.aliases import gated_hint, resolve_model
from profit_ds.model.ds_config import (deepspeed_zero, load_ds_config, offloads_params,
                                       uses_zero3, without_zero_init)

if TYPE_CHECKING:
    from profit_ds.adapters.base import Adapter

BF16 = 2
CUDA_CONTEXT = 1 * GB  # the CUDA context and library handles, before the weights (assumed)
PROMPT_TENSORS = 4
DEFAULT_CONFIGS = ("zero3_gpu_bf16", "zero3_gpu_bf16_offload")


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide memory, exact for the architecture.

    largest_module_params: most parameters owned directly by one module (DeepSpeed's "largest
    layer", e.g. the embedding). param_numels: every parameter tensor's size, in module order,
    to apply the persistence threshold exactly as DeepSpeed does.
    """

    name: str
    params: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    largest_module_params: int
    decoder_layer_params: int
    param_numels: tuple[int, ...]
    dims: Dims


@dataclass(frozen=True)
class Workload:
    """What one training step puts on the GPUs: B rows per client, each `seq_len` tokens of
    source and target after the P prompt tokens, of which `target_tokens` carry a loss."""

    gpus: int
    nodes: int
    prompt_tokens: int  # positions the adapter adds to a row (0 for LoRA)
    seq_len: int
    micro_batch: int
    target_tokens: int
    state_floats: int = 0  # one client's trainable state (the adapter's `floats`)
    adapter: "Adapter | None" = None  # what its own saved tensors add (`Adapter.saved_bytes`)

    @property
    def world(self) -> int:
        return self.gpus * self.nodes


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU, by what holds them."""

    weights: int
    gathered: int
    activations: int
    prompts: int
    runtime: int

    @property
    def total(self) -> int:
        return self.weights + self.gathered + self.activations + self.prompts + self.runtime


@dataclass(frozen=True)
class Plan:
    """The verdict: which config, how many clients in parallel, and the memory that implies."""

    shape: ModelShape
    workload: Workload
    gpu_mem_bytes: int
    ds_config: str
    offload: bool
    clients_in_parallel: int
    fits: bool
    memory: Memory
    budgets: Budgets
    deepspeed_estimate: int
    cpu_offload_bytes_per_node: int

    def to_dict(self) -> dict:
        """JSON-ready: sizes in GB (10^9 bytes), as the table prints them."""
        shape = {k: v for k, v in asdict(self.shape).items() if k not in ("param_numels", "dims")}
        per_gpu = {k: v / GB for k, v in asdict(self.memory).items()}
        return {"model": shape, "bf16_total_gb": BF16 * self.shape.params / GB,
                "workload": asdict(self.workload), "gpu_mem_gb": self.gpu_mem_bytes / GB,
                "ds_config": self.ds_config, "offload_params": self.offload,
                "clients_in_parallel": self.clients_in_parallel, "fits": self.fits,
                "budgets": self.budgets.to_dict(),
                "per_gpu_gb": {**per_gpu, "total": self.memory.total / GB},
                "deepspeed_estimate_gb": self.deepspeed_estimate / GB,
                "cpu_offload_gb_per_node": self.cpu_offload_bytes_per_node / GB}


def model_config(name: str):
    """The transformers config of `--model`, without weights: from the alias table offline, a
    local directory's config.json, or the hub's config.json (read from the HF cache if there)."""
    from transformers import AutoConfig

    ref = resolve_model(name)
    if ref.alias is not None:
        return AutoConfig.for_model(**ref.alias.config)
    try:
        if ref.kind == "gguf":  # the file's metadata: no dequantization
            where = Path(ref.location)
            return AutoConfig.from_pretrained(where.parent, gguf_file=where.name)
        return AutoConfig.from_pretrained(ref.location)
    except (OSError, ValueError) as err:
        hint = gated_hint(ref.location, err) or "give an alias (profit-ds models) or a local path"
        raise UsageError(f"--model {name}: cannot read its config.json "
                         f"({str(err).splitlines()[0]}); {hint}") from None


def shape_of(config, name: str) -> ModelShape:
    """Instantiate the architecture on the meta device (nothing allocated) and measure it."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with without_zero_init(), torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except ValueError as err:  # a config transformers has no causal LM for
        raise UsageError(f"--model {name}: {str(err).splitlines()[0]}") from None
    numels = tuple(p.numel() for p in model.parameters())
    layers = _decoder_layers(model, config.num_hidden_layers, name)
    return ModelShape(
        name=name, params=sum(numels), hidden_size=config.hidden_size,
        intermediate_size=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
        num_layers=config.num_hidden_layers, vocab_size=config.vocab_size,
        largest_module_params=max(sum(p.numel() for p in m.parameters(recurse=False))
                                  for m in model.modules()),
        decoder_layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        param_numels=numels, dims=Dims.of(config))


def _decoder_layers(model, num_layers: int, name: str):
    """The ModuleList of the model's decoder layers, found by its length."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers:
            return module
    raise UsageError(f"--model {name}: cannot find its {num_layers} decoder layers")


def model_shape(name: str) -> ModelShape:
    """The shape of `--model`, from its config alone."""
    return shape_of(model_config(name), name)


def window_bytes(shape: ModelShape, zero, param_bytes: int = BF16) -> int:
    """ZeRO-3's gathered working set: what it all-gathers at once during a forward (a layer,
    the prefetched ones, or the largest single module), freed after use."""
    window = min(zero.max_live_parameters, shape.decoder_layer_params + zero.prefetch_bucket_size)
    return param_bytes * max(shape.largest_module_params, window)


def gathered_bytes(shape: ModelShape, zero) -> int:
    """Parameters whole on the GPU at once: the gathered working set plus persistent ones."""
    return window_bytes(shape, zero) + BF16 * persistent_params(shape, zero)


def persistent_params(shape: ModelShape, zero) -> int:
    """Elements DeepSpeed keeps unpartitioned: each parameter at or under the threshold, in
    order, until the model-wide cap (DeepSpeedZeRoOffload.mark_persistent_parameters)."""
    total = 0
    for numel in shape.param_numels:
        if numel <= zero.param_persistence_threshold and (
                total + numel <= zero.model_persistence_threshold):
            total += numel
    return total


def activation_bytes(shape: ModelShape, rows: int, tokens: int, label_tokens: int) -> int:
    """Saved-for-backward bytes of `rows` rows of `tokens` tokens, `label_tokens` labels each
    (bf16, SDPA attention): `memory.token_costs`, the rule a run sizes its forwards by."""
    costs = token_costs(shape.dims, "bf16")
    return costs.train(rows, tokens, tokens, rows * label_tokens)


def work_shape_of(work: Workload) -> WorkShape:
    """The run's view of a planned workload: every row as long as the token limits allow."""
    return WorkShape(batch_size=work.micro_batch, mean_row=work.seq_len,
                     longest_row=work.seq_len,
                     label_share=min(work.target_tokens, work.seq_len) / work.seq_len,
                     prompt_tokens=work.prompt_tokens,
                     longest_context=work.prompt_tokens + max(1, work.seq_len - work.target_tokens),
                     new_tokens=work.target_tokens + 1, world=work.world)


def run_budgets(shape: ModelShape, work: Workload, gpu_mem: int, weights: int,
                window: int) -> Budgets:
    """The budgets a run takes on a GPU of `gpu_mem` bytes holding `weights` bytes of its
    weights and gathering `window` bytes at a time: what `free_memory` would find there."""
    free = max(0, gpu_mem - CUDA_CONTEXT - weights)
    memory = max(0, usable_gpu_memory(free) - window)
    return budgets(shape.dims, "bf16", False, memory, "cuda", work_shape_of(work),
                   memory_source=f"planned for {gpu_mem / GB:g} GB", adapter=work.adapter)


def memory(shape: ModelShape, work: Workload, zero, offload: bool, clients: int,
           gpu_mem: int) -> tuple[Memory, Budgets]:
    """Bytes per GPU with `clients` clients in parallel, and the run's budgets there."""
    weights = 0 if offload else math.ceil(BF16 * shape.params / work.world)
    zero3 = uses_zero3(work.world, offload)  # a whole model (no ZeRO-3) gathers nothing
    window = window_bytes(shape, zero) if zero3 else 0
    gathered = window + (BF16 * persistent_params(shape, zero) if zero3 else 0)
    plan_budgets = run_budgets(shape, work, gpu_mem, weights + gathered - window, window)
    costs, w = plan_budgets.forward.costs, work_shape_of(work)
    rows = max(1, plan_budgets.tokens_per_forward // w.longest_row)
    train = costs.train(rows, w.longest_row, w.prompt_tokens + w.longest_row,
                        int(rows * w.longest_row * w.label_share))
    rows_per_call = call_rows(plan_budgets.generation_rows, plan_budgets.generation_tokens,
                              w.longest_context + w.new_tokens)
    generation = costs.generate(rows_per_call, w.longest_context, w.new_tokens)
    return Memory(weights=weights, gathered=gathered, activations=max(train, generation),
                  prompts=clients * work.state_floats * 4 * PROMPT_TENSORS,
                  runtime=CUDA_CONTEXT + CUDA_RESERVE), plan_budgets


def deepspeed_estimate(shape: ModelShape, work: Workload, offload: bool) -> int:
    """DeepSpeed's GPU figure for ZeRO-3 model states, parameter part only.

    With cpu_offload=True its optimizer states are counted on the CPU, which leaves on the GPU
    exactly the bf16 shard (none with param offload) plus 4 bytes x the largest layer.
    """
    estimate = deepspeed_zero().stage3.estimate_zero3_model_states_mem_needs
    _, gpu, _ = estimate(shape.params, shape.largest_module_params, num_gpus_per_node=work.gpus,
                         num_nodes=work.nodes, cpu_offload=True, cpu_offload_params=offload)
    return gpu


def default_workload(name: str, gpus: int, nodes: int = 1, prompt_tokens: int | None = None,
                     seq_len: int | None = None, micro_batch: int | None = None,
                     adapter: dict | None = None) -> Workload:
    """Unset numbers default to what `profit-ds run` would use for this model; `adapter`:
    run options of the adapter (e.g. {"adapter": "lora", "lora_rank": 16})."""
    from profit_ds import adapters

    values = {"model": name, **(adapter or {})}
    if prompt_tokens:
        values["prompt_tokens"] = prompt_tokens
    run = build(values)
    if gpus < 1 or nodes < 1:
        raise UsageError("--gpus and --nodes must be >= 1")
    chosen = adapters.create(run)
    work = Workload(gpus=gpus, nodes=nodes, prompt_tokens=chosen.positions,
                    seq_len=seq_len or run.max_source_tokens + run.max_target_tokens,
                    micro_batch=micro_batch or run.batch_size,
                    target_tokens=run.max_target_tokens,
                    state_floats=chosen.floats(model_shape(name).dims), adapter=chosen)
    if min(work.seq_len, work.micro_batch) < 1 or (run.adapter == "prompt"
                                                    and work.prompt_tokens < 1):
        raise UsageError("--prompt-tokens, --seq-len and --micro-batch must be >= 1")
    return work


@dataclass(frozen=True)
class _Option:
    """One candidate config: its memory and budgets."""

    name: str
    offload: bool
    memory: Memory
    budgets: Budgets
    fits: bool


def _option(name: str, shape: ModelShape, work: Workload, gpu_mem: int,
            clients: int | None) -> _Option:
    config = load_ds_config(name, dtype="bf16", micro_batch=work.micro_batch)
    zero = deepspeed_zero().config.DeepSpeedZeroConfig(**config["zero_optimization"])
    offload = offloads_params(config)
    mem, plan_budgets = memory(shape, work, zero, offload, 1, gpu_mem)
    k = clients or plan_budgets.clients_in_parallel
    mem, _ = memory(shape, work, zero, offload, k, gpu_mem)
    # it fits when one longest row does (with activation checkpointing if need be) and the
    # whole plan stays within the GPU
    w = work_shape_of(work)
    one_row = plan_budgets.forward.costs.train(1, w.longest_row, w.prompt_tokens + w.longest_row,
                                               int(w.longest_row * w.label_share))
    fits = one_row <= plan_budgets.memory and mem.total <= gpu_mem
    return _Option(name, offload, mem, replace(plan_budgets, clients_in_parallel=k), fits)


def plan(shape: ModelShape, work: Workload, gpu_mem_gb: float = 80.0,
         clients_in_parallel: int | None = None, ds_config: str | None = None) -> Plan:
    """Choose the config: the user's, else the first of plain and parameter offload that fits
    (offload costs PCIe traffic on every layer, so it is chosen only when it is what makes
    the run fit). K defaults to the run's K=auto: the clients whose rows fill one forward."""
    gpu_mem = int(gpu_mem_gb * GB)
    options = [_option(name, shape, work, gpu_mem, clients_in_parallel)
               for name in ((ds_config,) if ds_config else DEFAULT_CONFIGS)]
    best = next((o for o in options if o.fits), options[-1])
    return Plan(shape=shape, workload=work, gpu_mem_bytes=gpu_mem, ds_config=best.name,
                offload=best.offload, clients_in_parallel=best.budgets.clients_in_parallel,
                fits=best.fits, memory=best.memory, budgets=best.budgets,
                deepspeed_estimate=deepspeed_estimate(shape, work, best.offload),
                cpu_offload_bytes_per_node=(BF16 * shape.params // work.nodes
                                            if best.offload else 0))
