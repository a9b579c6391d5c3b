"""The run configuration: one dataclass, resolved from defaults <- `--config FILE` <- flags.

Every field is recorded in results.json, so a run can be reproduced from its own output.
Validation happens here, before anything is loaded, with errors that name the flag.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from profit_ds.errors import UsageError
from profit_ds.fl.optim import CLIENT_OPTIMIZERS
from profit_ds.fl.server import SERVER_OPTIMIZERS
from profit_ds.model.builtin import BUILTIN_NAMES

ALGORITHMS = ("fedavg", "fedsgd")


@dataclass
class RunConfig:
    # what to run on
    model: str = "tiny"
    data: str = "builtin"
    heterogeneity: str = "task"
    language: str = "English"
    positive_examples: int = 0
    num_clients: int | None = 48
    validation_fraction: float = 1 / 6
    test_fraction: float = 1 / 6
    instances_per_task: int = 80
    max_per_client: int | None = None
    max_source_tokens: int | None = 256
    max_target_tokens: int | None = 64
    # federated training
    algo: str = "fedavg"
    rounds: int = 15
    clients_per_round: int = 12
    local_epochs: int = 2
    batch_size: int = 8
    client_opt: str = "adam"
    client_lr: float = 0.1
    server_opt: str = "sgd"
    server_lr: float = 1.0
    prompt_tokens: int | None = None  # None: 20 for the built-in model, 100 otherwise
    prompt_init: str = "vocab"
    # personalization
    personalize_opt: str = "sgd"
    personalize_lrs: list[float] = field(default_factory=lambda: [1.0, 30.0, 300.0])
    personalize_epochs: int = 3
    # evaluation
    eval_every: int = 5
    eval_batch_size: int = 256
    max_new_tokens: int | None = None  # None: longest reference in the eval sets + 1
    # machine
    dtype: str = "fp32"
    clients_in_parallel: str = "auto"
    num_procs: int = 1
    ds_config: str | None = None
    trust_remote_code: bool = False
    seed: int = 0
    output_dir: str = "runs/default"
    overwrite: bool = False
    resume: bool = False

    def resolved_prompt_tokens(self) -> int:
        if self.prompt_tokens is not None:
            return self.prompt_tokens
        return 20 if self.model in BUILTIN_NAMES else 100

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["prompt_tokens"] = self.resolved_prompt_tokens()
        return d


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"--{name.replace('_', '-')} must be {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value}")


def validate(cfg: RunConfig) -> None:
    """Reject impossible settings before anything is loaded."""
    choices = {"algo": ALGORITHMS, "client_opt": CLIENT_OPTIMIZERS,
               "personalize_opt": CLIENT_OPTIMIZERS, "server_opt": SERVER_OPTIMIZERS,
               "prompt_init": ("vocab", "random"), "dtype": ("fp32", "bf16")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected one of "
                             f"{', '.join(allowed)}")
    for name in ("rounds", "clients_per_round", "local_epochs", "batch_size", "client_lr",
                 "server_lr", "eval_batch_size", "num_procs", "instances_per_task",
                 "max_per_client", "max_source_tokens", "max_target_tokens", "max_new_tokens",
                 "num_clients"):
        _positive(name, getattr(cfg, name))
    _positive("prompt_tokens", cfg.resolved_prompt_tokens())
    _positive("personalize_epochs", cfg.personalize_epochs, allow_zero=True)
    _positive("eval_every", cfg.eval_every, allow_zero=True)
    if not cfg.personalize_lrs:
        raise UsageError("--personalize-lrs: give at least one learning rate")
    for lr in cfg.personalize_lrs:
        _positive("personalize_lrs", lr, allow_zero=True)
    if cfg.clients_in_parallel != "auto":
        try:
            k = int(cfg.clients_in_parallel)
        except ValueError:
            raise UsageError(f"--clients-in-parallel {cfg.clients_in_parallel}: expected a "
                             "positive integer or auto") from None
        _positive("clients_in_parallel", k)


# annotation strings, e.g. "int | None" (this module uses postponed annotations)
FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def coerce(name: str, value: Any, where: str) -> Any:
    """`value` as RunConfig field `name` takes it, or a UsageError naming `where`."""
    if name == "clients_in_parallel" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # `clients_in_parallel: 4` means "4", as with --config
    for alt in (a.strip() for a in FIELD_TYPES[name].split("|")):
        if alt == "None" and value is None:
            return None
        if alt == "bool" and isinstance(value, bool):
            return value
        if alt == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if alt == "float" and _is_number(value):
            return float(value)
        if alt == "str" and isinstance(value, str):
            return value
        if alt == "list[float]" and isinstance(value, list) and all(map(_is_number, value)):
            return [float(x) for x in value]
    expected = FIELD_TYPES[name].replace("list[float]", "a list of numbers").replace("|", "or")
    raise UsageError(f"{where}: expected {expected}, got {value!r}")


def read_config_file(path: str) -> Any:
    """The parsed content of a `--config` file (JSON by suffix, else YAML), or a UsageError
    naming the file; shared by `run --config` and `sweep --config`."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix == ".json":
            return json.loads(text)
        import yaml
        return yaml.safe_load(text)
    except Exception as err:  # yaml and json raise different types; both mean "malformed"
        raise UsageError(f"--config {path}: cannot parse ({str(err).splitlines()[0]})") from None


def load_config_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON run config; unknown keys are an error naming the key."""
    data = read_config_file(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    known = {f.name for f in fields(RunConfig)}
    normalized = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalized) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown option {unknown[0]!r}")
    return {k: coerce(k, v, f"--config {path}: {k}") for k, v in normalized.items()}


def resolve(config_file: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults, then the config file, then explicitly given flags (non-None overrides)."""
    values: dict[str, Any] = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = RunConfig(**values)
    except TypeError as err:
        raise UsageError(f"config: {err}") from None
    if isinstance(cfg.clients_in_parallel, int):
        cfg.clients_in_parallel = str(cfg.clients_in_parallel)
    validate(cfg)
    return cfg
