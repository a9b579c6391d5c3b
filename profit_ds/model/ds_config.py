"""The DeepSpeed ZeRO-3 configs profit-ds ships, and loading a user's own (`--ds-config FILE`).

Bundled (each documented in docs/GPU.md, as JSON holds no comments):
  zero3_cpu_fp32          laptops and CI: fp32, every parameter partitioned, even the tiny ones;
  zero3_gpu_bf16          GPUs: bf16 weights, small parameters kept whole on every GPU;
  zero3_gpu_bf16_offload  backbones larger than the GPUs' memory: shards live in pinned CPU RAM.
They ship inside the package (`profit_ds/assets/ds_configs/`) so an installed profit-ds finds
them; the repo's `ds_configs/` holds identical copies to read, copy and edit (a test keeps them
identical). None has an optimizer section: the backbone is frozen and the prompts are trained
outside DeepSpeed (DESIGN.md point 2).
"""
from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import sys
from importlib import resources
from pathlib import Path
from types import ModuleType

from profit_ds.errors import UsageError

DTYPES = ("fp32", "bf16")
BUNDLED = ("zero3_cpu_fp32", "zero3_gpu_bf16", "zero3_gpu_bf16_offload")
DEFAULT_FOR_DTYPE = {"fp32": "zero3_cpu_fp32", "bf16": "zero3_gpu_bf16"}


def bundled_text(name: str) -> str:
    """The JSON text of a bundled config, read from the installed package."""
    return (resources.files("profit_ds") / "assets" / "ds_configs" / f"{name}.json").read_text(
        encoding="utf-8")


def load_ds_config(path_or_name: str | Path | None = None, *, dtype: str,
                   micro_batch: int) -> dict:
    """The ZeRO-3 config dict to give `deepspeed.initialize`, checked before any model loads.

    path_or_name: a JSON file, a bundled name (with or without `.json`; an existing file of that
    name wins), or None for the default of `dtype` (fp32: zero3_cpu_fp32, bf16: zero3_gpu_bf16).
    dtype: the backbone's precision; a config enabling another one is an error rather than
    silently overridden, because the user then asked for two different things.
    micro_batch: written to `train_micro_batch_size_per_gpu`. DeepSpeed requires a batch size
    even without an optimizer; profit-ds batches clients itself, so the value is bookkeeping.
    """
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if micro_batch < 1:
        raise UsageError(f"micro batch must be >= 1, got {micro_batch}")
    source, text = _read(path_or_name or DEFAULT_FOR_DTYPE[dtype])
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise UsageError(f"--ds-config {source}: not valid JSON ({err.msg}, line {err.lineno})"
                         ) from None
    if not isinstance(config, dict):
        raise UsageError(f"--ds-config {source}: expected a JSON object")
    _check_zero3(config, source)
    _set_precision(config, dtype, source)
    config["train_micro_batch_size_per_gpu"] = micro_batch
    return config


def offloads_params(config: dict) -> bool:
    """Whether the config keeps parameter shards in CPU memory instead of on the GPU."""
    offload = config.get("zero_optimization", {}).get("offload_param") or {}
    return offload.get("device", "none") == "cpu"


def uses_zero3(world: int, offload: bool) -> bool:
    """Whether a backbone runs under ZeRO-3: with several ranks, or with its parameters
    offloaded to CPU memory. One rank holding the whole model has nothing to partition, and
    ZeRO-3's hooks would only cost time (docs/BENCHMARKS.md). `load_backbone` and
    `profit-ds plan` both decide by this."""
    return world > 1 or offload


@contextlib.contextmanager
def without_zero_init():
    """Hide a registered ZeRO-3 config from transformers for a moment.

    While a ZeRO-3 backbone is loaded in this process (tests, or a planning call inside a run),
    transformers builds every model inside `deepspeed.zero.Init`: that would partition a model
    meant to stay whole, and it ignores the meta device, so it would materialize a 7B model
    that planning only means to measure.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def import_deepspeed() -> ModuleType:
    """DeepSpeed, imported the one way profit-ds does (every use goes through here).

    - The accelerator is named (`DS_ACCELERATOR=cpu` where torch sees no GPU): otherwise
      DeepSpeed guesses it and warns on every start.
    - Its import-time logs go to stderr (stdout is for a command's own output, e.g. `--json`),
      and its INFO logs are off.
    - It never JIT-builds its shared-memory communication op (`deepspeed_shm_comm`). DeepSpeed
      builds that C++ op on the first `init_distributed` on a CPU (about a minute, and only
      with a compiler); a process killed during the build leaves a lock file in the torch
      extensions cache on which every later process waits forever, silently. The op serves
      only DeepSpeed's inference all-reduce on CPUs; ZeRO-3's parameter all-gathers and our
      gradient all-reduce go through torch.distributed (gloo), so nothing here uses it.
      Without it, no run builds anything: none can hang on a stale lock or need a compiler.
    """
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
        # by module name: the attribute `deepspeed.comm.torch` is PyTorch itself
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None
    for name in ("DeepSpeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return deepspeed


def deepspeed_zero() -> ModuleType:
    """DeepSpeed's ZeRO package (its config model and stage-3 memory estimators)."""
    import_deepspeed()
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed.runtime.zero.config
        import deepspeed.runtime.zero.stage3  # the estimators live here
    return deepspeed.runtime.zero


def _read(path_or_name: str | Path) -> tuple[str, str]:
    """(name to show in errors, JSON text) of a file, else of the bundled config so named."""
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return str(path), path.read_text(encoding="utf-8")
    name = str(path_or_name).removesuffix(".json")
    if name in BUNDLED:
        return name, bundled_text(name)
    raise UsageError(f"--ds-config {path_or_name}: no such file, nor a bundled config "
                     f"({', '.join(BUNDLED)})")


def _check_zero3(config: dict, source: str) -> None:
    """Reject configs the design cannot run: not ZeRO-3, an optimizer, or a misspelt key.

    The zero_optimization section is validated by DeepSpeed's own model, so a typo fails here
    naming the file instead of inside `deepspeed.initialize` on every rank.
    """
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UsageError(f"--ds-config {source}: remove the {section!r} section; the "
                             "backbone is frozen and prompts are trained outside DeepSpeed")
    zero = config.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") != 3:
        raise UsageError(f"--ds-config {source}: needs \"zero_optimization\": {{\"stage\": 3}} "
                         "(the frozen backbone is partitioned with ZeRO-3)")
    from pydantic import ValidationError  # DeepSpeed's own dependency

    try:
        deepspeed_zero().config.DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(part) for part in first["loc"])
        raise UsageError(f"--ds-config {source}: zero_optimization.{field}: {first['msg']}"
                         ) from None


def _set_precision(config: dict, dtype: str, source: str) -> None:
    """Make the precision sections say `dtype`, refusing a config that says otherwise."""
    if config.get("fp16", {}).get("enabled"):
        raise UsageError(f"--ds-config {source}: fp16 is not supported; use bf16 or fp32")
    section = config.get("bf16", {})
    if "enabled" in section and bool(section["enabled"]) != (dtype == "bf16"):
        state = "enables" if section["enabled"] else "disables"
        raise UsageError(f"--ds-config {source} {state} bf16 but --dtype is {dtype}")
    config["bf16"] = {**section, "enabled": dtype == "bf16"}
