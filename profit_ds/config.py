"""The run configuration: one dataclass, resolved from defaults <- `--config FILE` <- flags.

Every field is recorded in results.json, so a run can be reproduced from its own output. Each
field's default and help text are written once, here: `profit-ds run` (and `data`, for the
partition fields) builds its flags from them (`profit_ds.cli.config_options`), and a
`--config` file takes the same names. Validation happens here, before anything is loaded, with
errors that name the flag.

This module imports nothing heavy (no torch), so `--help` stays fast: the choices that live
with their implementations are read when a config is validated.
"""
from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from profit_ds.adapters import ADAPTERS
from profit_ds.errors import UsageError
from profit_ds.fl.algorithms import ALGORITHMS
from profit_ds.model.builtin import BUILTIN_NAMES

HETEROGENEITY_HELP = "task, iid, categories:K or dirichlet:ALPHA"


def option(default: Any, help: str) -> Any:
    """A RunConfig field: its default and its `--help` text (None: derived, as `help` says)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


# Defaults that differ for a real pretrained backbone (any --model but the built-in one),
# found by measurement with SmolLM2-135M-Instruct on the SNI sample (docs/REAL_MODEL.md,
# scripts/real_model_defaults.py). The dataclass's own defaults are the built-in model's.
REAL_MODEL_DEFAULTS: dict[str, Any] = {
    "dtype": "auto",              # bf16 where matmuls are native (2-4x faster), else fp32
    "prompt_init": "text",        # vocab init lowered SmolLM2's global ROUGE-L; text kept it
    "max_source_tokens": 1024,    # SNI's (Tk-Instruct's) source length
    "max_target_tokens": 128,     # and target length
    "client_lr": 0.003,
    "personalize_lrs": [0.1, 0.3],
}

# Defaults that differ for LoRA (`--adapter lora`), by backbone. The built-in model's were
# measured on its default run (docs/FINDINGS.md §7). A pretrained model's, on SmolLM2 and the
# SNI sample (docs/REAL_MODEL.md, "LoRA on a pretrained backbone"): Adam at 1e-3, a common
# LoRA lr, took the federated global ROUGE-L from the backbone's 49.0 to 14.0 in 2 rounds;
# 1e-4 kept it. Personalization SGD at 0.03 and 0.3, measured over 3 seeds (FINDINGS §7):
# the two ends of the trade-off, 0.3 the unstable one. They take precedence over
# REAL_MODEL_DEFAULTS, which were tuned for prompts.
LORA_DEFAULTS: dict[str, dict[str, Any]] = {
    "builtin": {"client_lr": 0.03, "personalize_lrs": [0.03, 0.1, 0.3]},
    "pretrained": {"client_lr": 0.0001, "personalize_lrs": [0.03, 0.3]},
}


@dataclass
class RunConfig:
    # what to run on
    model: str = option("tiny", "Backbone: 'tiny' (built-in), an alias such as llama-7b "
                                "(profit-ds models), an HF id or a local path.")
    data: str = option("builtin", "'builtin', a directory of SNI task JSON files / a "
                                  "natural-instructions clone, or hf:NAME.")
    heterogeneity: str = option("task", HETEROGENEITY_HELP + ".")
    language: str = option("English", "SNI: keep tasks whose input/output language is this "
                                      "('any' keeps all).")
    positive_examples: int = option(0, "Demonstrations (Positive Examples) in each source "
                                       "text.")
    num_clients: int | None = option(48, "Number of clients (with --heterogeneity task and more "
                                         "clients than tasks, tasks are shared).")
    validation_fraction: float = option(1 / 6, "Share of clients that are validation clients.")
    test_fraction: float = option(1 / 6, "Share of clients that are test clients.")
    instances_per_task: int = option(80, "Built-in suite: instances per task.")
    max_per_client: int | None = option(None, "Cap on instances per client (default: none).")
    max_source_tokens: int | None = option(256, "Truncate source texts to this many tokens (the "
                                                "middle goes first).")
    max_target_tokens: int | None = option(64, "Truncate training targets to this many tokens.")
    chat_template: bool | None = option(None, "Wrap each source in the tokenizer's chat template "
                                              "as the user's turn, the target as the assistant's "
                                              "(default: on where the tokenizer has one, i.e. "
                                              "instruct models).")
    # federated training
    algo: str = option("fedavg", " | ".join(ALGORITHMS) + " (profit_ds/fl/algorithms/)")
    prox_mu: float = option(0.01, "--algo fedprox: the proximal weight mu (mu/2 ||w - "
                                  "w_global||^2 on every local step).")
    rounds: int = option(15, "Federated rounds.")
    clients_per_round: int = option(12, "Clients sampled per round.")
    local_epochs: int = option(2, "FedAvg local epochs.")
    batch_size: int = option(8, "Examples per client per local step.")
    client_opt: str = option("adam", "Client optimizer: adam | sgd")
    client_lr: float = option(0.1, "Client learning rate.")
    server_opt: str = option("sgd", "Server optimizer: sgd | adam | yogi | adagrad")
    server_lr: float = option(1.0, "Server learning rate (1 with sgd: plain averaging).")
    adapter: str = option("prompt", " | ".join(ADAPTERS) + ": what each client trains "
                                    "(profit_ds/adapters/).")
    prompt_tokens: int = option(20, "Virtual tokens P.")
    prompt_init: str = option("vocab", "vocab (embeddings of random tokens) | text (of "
                                       "--prompt-init-text, repeated to P tokens, as PEFT's TEXT "
                                       "init) | random (Gaussian)")
    prompt_init_text: str = option("Follow the instruction and answer the question.",
                                   "The phrase of --prompt-init text.")
    lora_rank: int = option(8, "--adapter lora: the rank r of every A (r x d_in) and B "
                               "(d_out x r).")
    lora_alpha: float = option(16.0, "--adapter lora: the scale alpha (the update is "
                                     "alpha / r * B A x, as PEFT's lora_alpha).")
    lora_targets: str = option("q_proj,v_proj", "--adapter lora: comma-separated names of the "
                                                "linear layers that get an adapter.")
    lora_aggregation: str = option("fedit", "--adapter lora: fedit (average A and B) | ffa "
                                            "(A frozen at its init, B trained and averaged) | "
                                            "fedsa (A averaged, each client keeps its own B)")
    # personalization
    personalize_opt: str = option("sgd", "Personalization optimizer: sgd | adam")
    personalize_lrs: list[float] = option([1.0, 30.0, 300.0], "Comma-separated lr grid (prompt "
                                          "gradients of the tiny model are small; retune for "
                                          "real backbones).")
    personalize_epochs: int = option(3, "Personalization epochs (each is scored).")
    # evaluation
    eval_every: int = option(5, "Score the global validation set every N rounds (0: never).")
    eval_batch_size: int | None = option(None, "Rows per generation batch per rank (default: "
                                               "as many as fit the memory budget, up to the "
                                               "device's cap).")
    max_new_tokens: int | None = option(None, "Generation length (default: longest reference "
                                              "+ 1, at most 128).")
    # machine
    dtype: str = option("fp32", "Backbone dtype: fp32 | bf16 | auto (bf16 where the device "
                                "multiplies bf16 natively, else fp32; prompts stay fp32).")
    clients_in_parallel: str = option("auto", "K clients per batched step, or auto (as many "
                                              "as fill one forward on every rank).")
    memory_budget: float | None = option(None, "GB a rank may use for activations, KV caches "
                                               "and batches (default: half the available RAM "
                                               "on a CPU, 90% of the free GPU memory less 1 GB "
                                               "on a GPU).")
    activation_checkpointing: str = option("auto", "auto (on only when one row does not fit "
                                                   "the memory budget without it) | on | off")
    num_procs: int = option(1, "Ranks on this machine.")
    ds_config: str | None = option(None, "DeepSpeed ZeRO-3 JSON config (default: the bundled "
                                         "one for --dtype).")
    trust_remote_code: bool = option(False, "Allow model repos to run their own code.")
    seed: int = option(0, "Seed for partitions, sampling, shuffles and prompt init.")
    output_dir: str = option("runs/default", "Where results go.")
    overwrite: bool = option(False, "Replace a finished run in --output-dir.")
    resume: bool = option(False, "Continue the unfinished run in --output-dir from its last "
                                 "checkpoint.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# the fields that decide a run's data and partition: what `profit-ds data` takes, so that it
# builds exactly the partition `profit-ds run` would (clients_per_round: run's check on it)
DATA_FIELDS = ("data", "heterogeneity", "num_clients", "validation_fraction", "test_fraction",
               "language", "positive_examples", "instances_per_task", "max_per_client",
               "clients_per_round", "seed")


FLOAT32_MAX = 3.4028234663852886e38  # prompts and their steps are fp32


def _positive(name: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"--{name.replace('_', '-')} must be a finite number "
                         f"{'>= 0' if allow_zero else '> 0'}, got {value}")
    if isinstance(value, float) and value > FLOAT32_MAX:
        raise UsageError(f"--{name.replace('_', '-')} {value:g}: larger than float32 holds "
                         f"({FLOAT32_MAX:.3g})")


def validate(cfg: RunConfig) -> None:
    """Reject impossible settings before anything is loaded."""
    from profit_ds.adapters.lora import AGGREGATIONS
    from profit_ds.fl.optim import CLIENT_OPTIMIZERS
    from profit_ds.fl.server import SERVER_OPTIMIZERS

    choices = {"algo": tuple(ALGORITHMS), "adapter": tuple(ADAPTERS),
               "lora_aggregation": AGGREGATIONS, "client_opt": CLIENT_OPTIMIZERS,
               "personalize_opt": CLIENT_OPTIMIZERS, "server_opt": SERVER_OPTIMIZERS,
               "prompt_init": ("vocab", "random", "text"), "dtype": ("fp32", "bf16", "auto"),
               "activation_checkpointing": ("auto", "on", "off")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected one of "
                             f"{', '.join(allowed)}")
    for name in ("rounds", "clients_per_round", "local_epochs", "batch_size", "client_lr",
                 "server_lr", "eval_batch_size", "num_procs", "instances_per_task",
                 "max_per_client", "max_source_tokens", "max_target_tokens", "max_new_tokens",
                 "num_clients"):
        _positive(name, getattr(cfg, name))
    _positive("prompt_tokens", cfg.prompt_tokens)
    _positive("lora_rank", cfg.lora_rank)
    _positive("lora_alpha", cfg.lora_alpha)
    if not all(t.strip() for t in cfg.lora_targets.split(",")):
        raise UsageError(f"--lora-targets {cfg.lora_targets!r}: expected comma-separated "
                         "module names such as q_proj,v_proj")
    if cfg.lora_aggregation == "fedsa" and cfg.algo == "fedsgd" and cfg.adapter == "lora":
        raise UsageError("--lora-aggregation fedsa: clients keep their B between local "
                         "trainings, which --algo fedsgd does not have (use fedavg, fedprox "
                         "or scaffold)")
    _positive("prox_mu", cfg.prox_mu, allow_zero=True)
    _positive("memory_budget", cfg.memory_budget)
    if cfg.prompt_init == "text" and not cfg.prompt_init_text.strip():
        raise UsageError("--prompt-init-text: give a phrase for --prompt-init text")
    _positive("personalize_epochs", cfg.personalize_epochs, allow_zero=True)
    _positive("eval_every", cfg.eval_every, allow_zero=True)
    _positive("positive_examples", cfg.positive_examples, allow_zero=True)
    for name in ("validation_fraction", "test_fraction"):
        _positive(name, getattr(cfg, name), allow_zero=True)
    if not cfg.personalize_lrs:
        raise UsageError("--personalize-lrs: give at least one learning rate")
    for i, lr in enumerate(cfg.personalize_lrs):
        _positive("personalize_lrs", lr, allow_zero=True)
        if lr in cfg.personalize_lrs[:i]:
            raise UsageError(f"--personalize-lrs: {lr:g} appears twice")
    if not -2**63 <= cfg.seed < 2**63:
        raise UsageError(f"--seed {cfg.seed}: must be an integer in [-2^63, 2^63)")
    if cfg.clients_in_parallel != "auto":
        try:
            k = int(cfg.clients_in_parallel)
        except ValueError:
            raise UsageError(f"--clients-in-parallel {cfg.clients_in_parallel}: expected a "
                             "positive integer or auto") from None
        _positive("clients_in_parallel", k)


# annotation strings, e.g. "int | None" (this module uses postponed annotations)
FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}
FIELDS = {f.name: f for f in fields(RunConfig)}


def field_type(name: str) -> Any:
    """A field's type with None removed: int, float, str, bool or list[float]."""
    hint = typing.get_type_hints(RunConfig)[name]
    args = typing.get_args(hint)
    return next(a for a in args if a is not type(None)) if type(None) in args else hint


def field_default(name: str) -> Any:
    """The default a field takes when neither a file nor a flag sets it."""
    return getattr(RunConfig(), name)


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
    for k in data:
        if not isinstance(k, str):  # YAML reads yes/no/on/off/true (and numbers) unquoted
            raise UsageError(f"--config {path}: key {k!r} is not an option name (YAML reads an "
                             "unquoted yes, no, on, off or number as a value; quote it)")
    normalized = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(normalized) - known)
    if unknown:
        raise UsageError(f"--config {path}: unknown option {unknown[0]!r}")
    return {k: coerce(k, v, f"--config {path}: {k}") for k, v in normalized.items()}


def model_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """`values` (the options set by a file or flags) completed with the defaults that depend
    on the model and the adapter: REAL_MODEL_DEFAULTS for any but the built-in one, then
    LORA_DEFAULTS for `--adapter lora`, for the keys not set."""
    model = values.get("model", RunConfig.__dataclass_fields__["model"].default)
    builtin = model in BUILTIN_NAMES
    defaults = {} if builtin else dict(REAL_MODEL_DEFAULTS)
    if values.get("adapter") == "lora":
        defaults.update(LORA_DEFAULTS["builtin" if builtin else "pretrained"])
    return {**{k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items()},
            **values}


def build(values: dict[str, Any]) -> RunConfig:
    """The validated RunConfig of the options in `values` (model-dependent defaults for the
    rest): one path for `run`, `data`, `--config` files and sweep cells."""
    try:
        cfg = RunConfig(**model_defaults(values))
    except TypeError as err:
        raise UsageError(f"config: {err}") from None
    if isinstance(cfg.clients_in_parallel, int):
        cfg.clients_in_parallel = str(cfg.clients_in_parallel)
    validate(cfg)
    if cfg.dtype == "auto":  # torch only when needed: --help and `plan` stay light
        from profit_ds import distributed
        from profit_ds.model.precision import resolve_dtype

        cfg.dtype = resolve_dtype(cfg.dtype, distributed.device())
    return cfg


def resolve(config_file: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Defaults, then the config file, then explicitly given flags (non-None overrides)."""
    values: dict[str, Any] = load_config_file(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return build(values)
