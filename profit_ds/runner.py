"""`profit-ds run` end to end: data -> backbone -> federated training -> personalization -> files.

Reads like the paper: score the initial prompt; train it federatedly for `rounds`; score the
federated prompt; personalize it on every test client and score each step of that; write
everything. Every rank executes this function (SPMD); rank 0 alone prints and writes.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

import profit_ds
from profit_ds import checkpoint, distributed, io
from profit_ds.config import RunConfig
from profit_ds.data.for_run import load_tasks, run_partition
from profit_ds.errors import UsageError
from profit_ds.evaluation.generate import evaluate
from profit_ds.fl.clients import ClientData, EvalSet, FederatedData, encode_partition
from profit_ds.fl.optim import ClientOptimizer
from profit_ds.fl.personalize import PersonalizeSpec, personalize, summarize
from profit_ds.fl.rounds import RoundSpec, federated_round
from profit_ds.fl.server import ServerOptimizer, ServerState
from profit_ds.model.aliases import resolve_model
from profit_ds.model.backbone import DTYPES, Backbone, init_prompt, load_backbone
from profit_ds.report import Reporter

CHECKPOINTS = "checkpoints"
RUN_LOG = "run.log"  # progress lines, warnings and the final tables, timestamped
# K=auto: rows x tokens of one step per rank (its forwards are cut smaller: fl/gradients.py)
TOKENS_PER_STEP = {"cpu": 8192, "cuda": 65536}


def clients_in_parallel(cfg: RunConfig, data: FederatedData, prompt_tokens: int) -> int:
    """K: `--clients-in-parallel`, or `auto` = as many clients per step as fit a token budget
    per rank (a full step of one client is `batch_size` rows of about the mean length)."""
    if cfg.clients_in_parallel != "auto":
        return int(cfg.clients_in_parallel)
    train = [e for c in data.train_clients for e in c.train]
    mean_len = prompt_tokens + sum(len(e.source) + len(e.target) for e in train) / max(1, len(train))
    budget = TOKENS_PER_STEP["cuda" if torch.cuda.is_available() else "cpu"] * distributed.world()
    return max(1, int(budget // (cfg.batch_size * mean_len)))


def max_new_tokens(cfg: RunConfig, data: FederatedData, tokenizer) -> int:
    """Enough new tokens for the longest reference in any evaluated set (+1 for EOS), <= 128."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    refs = [r for s in (data.global_test, data.global_validation) for rs in s.references
            for r in rs]
    longest = max((len(ids) for ids in tokenizer([" " + r for r in refs],
                                                 add_special_tokens=False)["input_ids"]),
                  default=16)
    return min(128, longest + 1)


def shared_prompt_scores(scores: Sequence[dict], clients: Sequence[ClientData]) -> dict:
    """Local and global scores of one prompt shared by all test clients.

    The global test set is the union of the test clients' local test sets, so its score is the
    example-weighted mean of the clients' scores: one generation pass gives both.
    """
    n = [len(c.test) for c in clients]
    out = {}
    for metric in ("rouge_l", "exact_match"):
        out[f"local_{metric}"] = sum(s[metric] for s in scores) / len(scores)
        out[f"global_{metric}"] = sum(s[metric] * k for s, k in zip(scores, n)) / sum(n)
    out["clients"] = {c.name: s["rouge_l"] for c, s in zip(clients, scores)}
    return out


def check_fits(cfg: RunConfig, model_config, tokenizer) -> None:
    """Refuse a tokenizer that does not match the model and sequences longer than its context.

    It needs only the model's config and tokenizer, so it runs before the weights load (a
    mistake costs no download): `load_backbone` calls it, and `profit-ds sweep` calls it for
    every cell before the first one runs. A run handed a loaded backbone checks it again.
    """
    rows = model_config.vocab_size
    if len(tokenizer) > rows:
        raise UsageError(f"--model {cfg.model}: the tokenizer has {len(tokenizer)} "
                         f"tokens but the model's embedding has {rows} rows (mismatched "
                         "tokenizer and weights?)")
    prompt_tokens = cfg.resolved_prompt_tokens()
    context = getattr(model_config, "max_position_embeddings", None)
    longest = prompt_tokens + (cfg.max_source_tokens or 0) + (cfg.max_target_tokens or 0)
    if context and longest > context:
        raise UsageError(f"--prompt-tokens {prompt_tokens}: prompt + --max-source-tokens "
                         f"{cfg.max_source_tokens} + --max-target-tokens {cfg.max_target_tokens}"
                         f" = {longest} tokens exceed the model's context of {context}")


def prepare_output(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a directory")
    if (out / "results.json").exists() and not cfg.overwrite:
        hint = "it is complete" if cfg.resume else "pass --overwrite to replace it"
        raise UsageError(f"--output-dir {out}: already holds a finished run ({hint})")
    if cfg.resume and not (out / "config.json").exists():
        raise UsageError(f"--resume: {out} holds no run to resume (no config.json)")
    if not cfg.resume and (out / CHECKPOINTS).exists() and not cfg.overwrite:
        raise UsageError(f"--output-dir {out}: holds an unfinished run "
                         "(pass --resume to continue it or --overwrite to start over)")
    return out


def environment() -> dict:
    """What produced the results: package versions (profit-ds itself included), the git
    commit of the profit-ds source and whether its package directory has uncommitted changes
    (None for both when it is not a git checkout), Python, and the devices: each visible
    GPU's name, else the CPU's model name, and the core count. Nothing here may fail a run."""
    def version(package: str) -> str | None:
        try:
            return md.version(package)
        except md.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True,
                                  timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    def cpu_model() -> str:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine()

    package = Path(profit_ds.__file__).resolve().parent
    source = package.parent
    commit = dirty = None
    # only when the package's parent is the checkout itself: an installed copy in a venv that
    # lies inside some other repository must not report that repository's commit
    top = git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == source:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--", package.name) if commit else None
        dirty = None if status is None else bool(status)
    versions = {"profit-ds": profit_ds.__version__,
                **{p: version(p) for p in ("torch", "deepspeed", "transformers", "peft",
                                           "accelerate", "rouge-score")},
                "cuda": torch.version.cuda}
    cuda = torch.cuda.is_available()
    devices = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
               if cuda else [cpu_model()])
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"versions": versions, "commit": commit, "dirty": dirty,
            "python": platform.python_version(), "platform": platform.platform(),
            "world_size": distributed.world(), "device": "cuda" if cuda else "cpu",
            "devices": devices, "cpu_cores": os.cpu_count(), "cpu_cores_usable": usable}


@dataclass
class Progress:
    """Everything finished so far: what a checkpoint holds and a resume restores."""

    prompt: torch.Tensor
    server: ServerState = field(default_factory=ServerState)
    round: int = 0
    rounds: list[dict] = field(default_factory=list)
    initial: dict | None = None
    federated: dict | None = None
    records: list[dict] = field(default_factory=list)
    client_prompts: dict[str, dict[float, torch.Tensor]] = field(default_factory=dict)

    def to_checkpoint(self) -> checkpoint.Checkpoint:
        tensors = {"prompt": self.prompt, **{f"server/{k}": v
                                             for k, v in self.server.tensors().items()}}
        for name, by_lr in self.client_prompts.items():
            tensors.update({f"client/{name}/{lr!r}": p for lr, p in by_lr.items()})
        state = {"server_step": self.server.step, "rounds": self.rounds,
                 "initial": self.initial, "federated": self.federated,
                 "records": self.records}
        return checkpoint.Checkpoint(self.round, tensors, state)

    @classmethod
    def from_checkpoint(cls, ckpt: checkpoint.Checkpoint) -> "Progress":
        t, st = ckpt.tensors, ckpt.state
        prompts: dict[str, dict[float, torch.Tensor]] = {}
        for key, value in t.items():
            if key.startswith("client/"):
                _, name, lr = key.split("/", 2)
                prompts.setdefault(name, {})[float(lr)] = value
        server = ServerState(st["server_step"], t.get("server/m"), t.get("server/v"))
        return cls(t["prompt"], server, ckpt.round, st["rounds"], st["initial"],
                   st["federated"], st["records"], prompts)


def run(cfg: RunConfig, backbone: Backbone | None = None) -> dict:
    """Run the whole pipeline; returns the results dict (also written to results.json).

    With `cfg.resume`, continues from the newest valid checkpoint in the output directory.

    `backbone`: an already loaded backbone to use instead of loading `cfg.model`. Why: a sweep
    (`profit_ds.sweep`) runs many configs on one backbone in one process; loading and sharding
    a 7B model takes minutes, and the weights are frozen, so every cell can share one load
    (results are identical: nothing here changes the backbone). It must have been loaded with
    `cfg`'s model, dtype, ds_config and trust_remote_code; name and dtype are checked.
    """
    t0 = time.perf_counter()
    out = prepare_output(cfg)
    resolve_model(cfg.model)  # a bad --model fails now, not after the data is loaded
    if distributed.is_main() and not cfg.resume:  # a fresh run (or --overwrite): a fresh log
        (out / RUN_LOG).unlink(missing_ok=True)
    reporter = Reporter(enabled=distributed.is_main(), log=out / RUN_LOG)
    partition = run_partition(cfg, load_tasks(cfg))
    cfg_hash = checkpoint.config_hash(cfg.to_dict())
    ckpt_dir = out / CHECKPOINTS
    restored = None
    if cfg.resume:
        restored = checkpoint.load_latest(ckpt_dir, cfg_hash, partition.manifest_hash,
                                          warn=reporter.warn)
    if backbone is None:
        backbone = load_backbone(cfg.model, cfg.dtype, cfg.ds_config, cfg.trust_remote_code,
                                 check=lambda config, tok: check_fits(cfg, config, tok))
    elif (backbone.name, backbone.dtype) != (cfg.model, DTYPES[cfg.dtype]):
        raise ValueError(f"backbone {backbone.name} ({backbone.dtype}) given for a run of "
                         f"--model {cfg.model} --dtype {cfg.dtype}")
    else:
        check_fits(cfg, backbone.model.config, backbone.tokenizer)
    P = cfg.resolved_prompt_tokens()
    data = encode_partition(backbone.tokenizer, partition, cfg.max_source_tokens,
                            cfg.max_target_tokens)
    k_parallel = clients_in_parallel(cfg, data, P)
    new_tokens = max_new_tokens(cfg, data, backbone.tokenizer)
    reporter.data_summary(partition, backbone, k_parallel)
    if distributed.is_main():
        if cfg.overwrite and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        io.write_json(out / "config.json", cfg.to_dict())
        io.write_json(out / "manifest.json", partition.manifest)
    timing: dict[str, float] = {"load_s": time.perf_counter() - t0}

    def score(bank: torch.Tensor, requests: Sequence[tuple[int, EvalSet]], label: str) -> list[dict]:
        with reporter.task(label, sum(len(s) for _, s in requests)) as advance:
            return evaluate(backbone, bank, requests, new_tokens, cfg.eval_batch_size, advance)

    def score_shared(prompt: torch.Tensor, label: str) -> dict:
        scores = score(prompt.unsqueeze(0), [(0, c.test) for c in data.test_clients], label)
        return shared_prompt_scores(scores, data.test_clients)

    def save(progress: Progress) -> None:
        if distributed.is_main():
            checkpoint.save(ckpt_dir, progress.to_checkpoint(), cfg_hash,
                            partition.manifest_hash)

    if restored:
        progress = Progress.from_checkpoint(restored)
        reporter.warn(f"resuming after round {progress.round} "
                      f"({len(progress.records)} personalization records done)")
    else:
        progress = Progress(init_prompt(backbone, P, cfg.prompt_init, cfg.seed))
    if progress.initial is None:
        t = time.perf_counter()
        progress.initial = score_shared(progress.prompt, "scoring the initial prompt")
        timing["initial_eval_s"] = time.perf_counter() - t
        save(progress)

    spec = RoundSpec(algo=cfg.algo, client_opt=ClientOptimizer(cfg.client_opt),
                     client_lr=cfg.client_lr, local_epochs=cfg.local_epochs,
                     batch_size=cfg.batch_size,
                     server_opt=ServerOptimizer(cfg.server_opt, cfg.server_lr),
                     clients_per_round=cfg.clients_per_round, seed=cfg.seed)
    metrics_path = out / "metrics.jsonl"
    if distributed.is_main():  # rewrite what the checkpoint vouches for; drop anything later
        io.write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in progress.rounds))
    t = time.perf_counter()
    with reporter.task("federated training", cfg.rounds) as advance:
        advance(progress.round)
        for r in range(progress.round + 1, cfg.rounds + 1):
            tr = time.perf_counter()
            progress.prompt, metrics = federated_round(backbone, progress.prompt,
                                                       progress.server, data.train_clients,
                                                       spec, r, k_parallel)
            if cfg.eval_every and (r % cfg.eval_every == 0 or r == cfg.rounds) \
                    and len(data.global_validation):
                val = score(progress.prompt.unsqueeze(0), [(0, data.global_validation)],
                            "scoring on the global validation set")[0]
                metrics["val_rouge_l"] = val["rouge_l"]
            metrics["seconds"] = time.perf_counter() - tr
            progress.rounds.append(metrics)
            progress.round = r
            save(progress)
            if distributed.is_main():
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
            advance(1, f"round {r}/{cfg.rounds} loss {metrics['train_loss']:.3f}")
    timing["train_s"] = time.perf_counter() - t

    if progress.federated is None:
        t = time.perf_counter()
        progress.federated = score_shared(progress.prompt, "scoring the federated prompt")
        timing["global_eval_s"] = time.perf_counter() - t
        save(progress)

    t = time.perf_counter()
    pspec = PersonalizeSpec(ClientOptimizer(cfg.personalize_opt), cfg.personalize_lrs,
                            cfg.personalize_epochs, cfg.batch_size, cfg.seed)
    pairs = len(data.test_clients) * len(cfg.personalize_lrs)
    per_pair = {c.name: (len(c.test) + len(data.global_test)) * cfg.personalize_epochs
                for c in data.test_clients}
    total = sum(per_pair.values()) * len(cfg.personalize_lrs)
    with reporter.task("personalization", total) as advance:
        advance(sum(per_pair[n] for n, by_lr in progress.client_prompts.items() for _ in by_lr))

        def evaluate_bank(bank, requests):
            return evaluate(backbone, bank, requests, new_tokens, cfg.eval_batch_size, advance)

        def group_done(records, prompts):
            progress.records, progress.client_prompts = records, prompts
            save(progress)

        records, client_prompts = personalize(
            backbone, progress.prompt, data.test_clients, data.global_test, pspec,
            min(k_parallel, pairs), evaluate_bank,
            done=(progress.records, progress.client_prompts), on_group_done=group_done)
    timing["personalize_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0

    results = {"config": cfg.to_dict(),
               "data": {"manifest_hash": partition.manifest_hash,
                        "train_clients": len(data.train_clients),
                        "validation_clients": len(data.validation_clients),
                        "test_clients": len(data.test_clients),
                        "global_test_examples": len(data.global_test),
                        "truncation": data.truncation},
               "rounds": progress.rounds, "initial": progress.initial,
               "global": progress.federated, "personalized": summarize(records),
               "personalized_clients": sorted(records, key=_record_order(cfg)),
               "timing": timing, "environment": environment()}
    if distributed.is_main():
        _write_outputs(out, cfg, progress.prompt, client_prompts, results)
        reporter.results(results, out)
    return results


def _record_order(cfg: RunConfig):
    """Records in (client, lr, epoch) order, however the pairs were grouped or resumed."""
    lr_index = {lr: i for i, lr in enumerate(cfg.personalize_lrs)}
    return lambda r: (r["client"], lr_index[r["lr"]], r["epoch"])


def _write_outputs(out: Path, cfg: RunConfig, prompt: torch.Tensor,
                   client_prompts: dict[str, dict[float, torch.Tensor]], results: dict) -> None:
    """Final files; results.json last, since its presence marks the run finished."""
    meta = {"model": cfg.model, "prompt_tokens": str(prompt.shape[0])}
    io.write_tensors(out / "global_prompt.safetensors", {"prompt": prompt}, meta)
    for name, by_lr in client_prompts.items():
        io.write_tensors(out / "clients" / f"{name}.safetensors",
                         {f"lr={lr:g}": p for lr, p in by_lr.items()},
                         {**meta, "epochs": str(cfg.personalize_epochs)})
    io.write_json(out / "results.json", results)
