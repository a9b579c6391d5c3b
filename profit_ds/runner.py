"""`profit-ds run` end to end: data -> backbone -> federated training -> personalization -> files.

Reads like the paper: score the initial prompt; train it federatedly for `rounds`; score the
federated prompt; personalize it on every test client and score each step of that; write
everything. Every rank executes this function (SPMD); rank 0 alone prints and writes.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import time
from pathlib import Path
from typing import Sequence

import torch

from profit_ds import distributed, io
from profit_ds.config import RunConfig
from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.format import FormatSpec
from profit_ds.data.partition import PartitionSpec, build_partition
from profit_ds.errors import UsageError
from profit_ds.evaluation.generate import evaluate
from profit_ds.fl.clients import ClientData, EvalSet, FederatedData, encode_partition
from profit_ds.fl.optim import ClientOptimizer
from profit_ds.fl.personalize import PersonalizeSpec, personalize, summarize
from profit_ds.fl.rounds import RoundSpec, federated_round
from profit_ds.fl.server import ServerOptimizer, ServerState
from profit_ds.model.backbone import init_prompt, load_backbone, resolve_path
from profit_ds.report import Reporter

TOKENS_PER_FORWARD = {"cpu": 8192, "cuda": 65536}  # rows x tokens one rank handles well


def load_tasks(cfg: RunConfig):
    """Tasks for `--data`: the built-in suite, or SNI through profit_ds.data.loading."""
    if cfg.data == "builtin":
        return builtin_tasks(instances_per_task=cfg.instances_per_task)
    from profit_ds.data.loading import load_tasks as load_sni
    return load_sni(cfg.data, languages=None if cfg.language == "any" else (cfg.language,))


def clients_in_parallel(cfg: RunConfig, data: FederatedData, prompt_tokens: int) -> int:
    """K: `--clients-in-parallel`, or `auto` = as many clients per step as fit a token budget
    per rank (a full step of one client is `batch_size` rows of about the mean length)."""
    if cfg.clients_in_parallel != "auto":
        return int(cfg.clients_in_parallel)
    train = [e for c in data.train_clients for e in c.train]
    mean_len = prompt_tokens + sum(len(e.source) + len(e.target) for e in train) / max(1, len(train))
    budget = TOKENS_PER_FORWARD["cuda" if torch.cuda.is_available() else "cpu"] * distributed.world()
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


def prepare_output(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if (out / "results.json").exists() and not cfg.overwrite:
        raise UsageError(f"--output-dir {out}: already holds a finished run "
                         "(pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a directory")
    return out


def environment() -> dict:
    versions = {p: md.version(p) for p in ("torch", "deepspeed", "transformers", "rouge-score")}
    return {"versions": versions, "world_size": distributed.world(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def run(cfg: RunConfig) -> dict:
    """Run the whole pipeline; returns the results dict (also written to results.json)."""
    t0 = time.perf_counter()
    out = prepare_output(cfg)
    resolve_path(cfg.model)  # a bad --model fails now, not after the data is loaded
    timing: dict[str, float] = {}
    reporter = Reporter(enabled=distributed.is_main())
    tasks = load_tasks(cfg)
    partition = build_partition(
        tasks, PartitionSpec(heterogeneity=cfg.heterogeneity, num_clients=cfg.num_clients,
                             max_per_client=cfg.max_per_client, seed=cfg.seed),
        FormatSpec(num_positive_examples=cfg.positive_examples))
    if cfg.clients_per_round > len(partition.train_clients):
        raise UsageError(f"--clients-per-round {cfg.clients_per_round}: only "
                         f"{len(partition.train_clients)} train clients")
    backbone = load_backbone(cfg.model, cfg.dtype, _ds_config(cfg), cfg.trust_remote_code)
    P = cfg.resolved_prompt_tokens()
    data = encode_partition(backbone.tokenizer, partition, cfg.max_source_tokens,
                            cfg.max_target_tokens)
    k_parallel = clients_in_parallel(cfg, data, P)
    new_tokens = max_new_tokens(cfg, data, backbone.tokenizer)
    reporter.data_summary(partition, backbone, k_parallel)
    timing["load_s"] = time.perf_counter() - t0

    def score(bank: torch.Tensor, requests: Sequence[tuple[int, EvalSet]], label: str) -> list[dict]:
        with reporter.task(label, sum(len(s) for _, s in requests)) as advance:
            return evaluate(backbone, bank, requests, new_tokens, cfg.eval_batch_size, advance)

    def score_shared(prompt: torch.Tensor, label: str) -> dict:
        scores = score(prompt.unsqueeze(0), [(0, c.test) for c in data.test_clients], label)
        return shared_prompt_scores(scores, data.test_clients)

    prompt = init_prompt(backbone, P, cfg.prompt_init, cfg.seed)
    t = time.perf_counter()
    initial = score_shared(prompt, "scoring the initial prompt")
    timing["initial_eval_s"] = time.perf_counter() - t

    spec = RoundSpec(algo=cfg.algo, client_opt=ClientOptimizer(cfg.client_opt),
                     client_lr=cfg.client_lr, local_epochs=cfg.local_epochs,
                     batch_size=cfg.batch_size,
                     server_opt=ServerOptimizer(cfg.server_opt, cfg.server_lr),
                     clients_per_round=cfg.clients_per_round, seed=cfg.seed)
    server_state = ServerState()
    rounds: list[dict] = []
    metrics_path = out / "metrics.jsonl"
    if distributed.is_main():
        io.write_text(metrics_path, "")
    t = time.perf_counter()
    with reporter.task("federated training", cfg.rounds) as advance:
        for r in range(1, cfg.rounds + 1):
            tr = time.perf_counter()
            prompt, metrics = federated_round(backbone, prompt, server_state,
                                              data.train_clients, spec, r, k_parallel)
            if cfg.eval_every and (r % cfg.eval_every == 0 or r == cfg.rounds) \
                    and len(data.global_validation):
                val = score(prompt.unsqueeze(0), [(0, data.global_validation)],
                            "scoring on the global validation set")[0]
                metrics["val_rouge_l"] = val["rouge_l"]
            metrics["seconds"] = time.perf_counter() - tr
            rounds.append(metrics)
            if distributed.is_main():
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
            advance(1, f"round {r}/{cfg.rounds} loss {metrics['train_loss']:.3f}")
    timing["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    federated = score_shared(prompt, "scoring the federated prompt")
    timing["global_eval_s"] = time.perf_counter() - t

    t = time.perf_counter()
    pspec = PersonalizeSpec(ClientOptimizer(cfg.personalize_opt), cfg.personalize_lrs,
                            cfg.personalize_epochs, cfg.batch_size, cfg.seed)
    pairs = len(data.test_clients) * len(cfg.personalize_lrs)
    evals_per_epoch = sum(len(c.test) + len(data.global_test) for c in data.test_clients) \
        * len(cfg.personalize_lrs)
    with reporter.task("personalization", evals_per_epoch * cfg.personalize_epochs) as advance:
        def evaluate_bank(bank, requests):
            return evaluate(backbone, bank, requests, new_tokens, cfg.eval_batch_size, advance)
        records, client_prompts = personalize(backbone, prompt, data.test_clients,
                                              data.global_test, pspec, min(k_parallel, pairs),
                                              evaluate_bank)
    timing["personalize_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0

    results = {"config": cfg.to_dict(),
               "data": {"manifest_hash": partition.manifest_hash,
                        "train_clients": len(data.train_clients),
                        "validation_clients": len(data.validation_clients),
                        "test_clients": len(data.test_clients),
                        "global_test_examples": len(data.global_test),
                        "truncation": data.truncation},
               "rounds": rounds, "initial": initial, "global": federated,
               "personalized": summarize(records), "personalized_clients": records,
               "timing": timing, "environment": environment()}
    if distributed.is_main():
        _write_outputs(out, cfg, prompt, client_prompts, partition.manifest, results)
        reporter.results(results, out)
    return results


def _ds_config(cfg: RunConfig) -> dict | None:
    if cfg.ds_config is None:
        return None
    path = Path(cfg.ds_config)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"--ds-config {path}: no such file") from None
    except json.JSONDecodeError as err:
        raise UsageError(f"--ds-config {path}: not valid JSON ({err.msg})") from None


def _write_outputs(out: Path, cfg: RunConfig, prompt: torch.Tensor,
                   client_prompts: dict[str, dict[float, torch.Tensor]], manifest: dict,
                   results: dict) -> None:
    meta = {"model": cfg.model, "prompt_tokens": str(prompt.shape[0])}
    io.write_tensors(out / "global_prompt.safetensors", {"prompt": prompt}, meta)
    for name, by_lr in client_prompts.items():
        io.write_tensors(out / "clients" / f"{name}.safetensors",
                         {f"lr={lr:g}": p for lr, p in by_lr.items()},
                         {**meta, "epochs": str(cfg.personalize_epochs)})
    io.write_json(out / "manifest.json", manifest)
    io.write_json(out / "config.json", cfg.to_dict())
    io.write_json(out / "results.json", results)
