"""The personalization study on a finished run (issue 5): a grid of learning rates x epochs x
proximal lambdas x interpolation weights, with the setting chosen as the paper does.

Why validation clients: picking the setting that looks best on the test clients reports an
optimistic number. The paper personalizes the (held-out) validation clients with every
setting, picks one by their local and global validation scores, and reports the test
clients' scores at that setting. `select_on="test"` (oracle selection) exists only to measure
that optimism; the output records which one was used and the rule's exact wording.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from profit_ds import distributed, io
from profit_ds.config import RunConfig, resolve
from profit_ds.errors import UsageError
from profit_ds.evaluation.generate import evaluate
from profit_ds.export import read_prompt
from profit_ds.fl.clients import ClientData, EvalSet, FederatedData, encode_partition
from profit_ds.fl.optim import CLIENT_OPTIMIZERS, ClientOptimizer
from profit_ds.fl.personalize import PersonalizeSpec, personalize
from profit_ds.model.backbone import Backbone, load_backbone
from profit_ds.report import Reporter
from profit_ds.runner import (
    clients_in_parallel,
    load_tasks,
    max_new_tokens,
    run_partition,
    shared_prompt_scores,
)

SETTING = ("lr", "prox_lambda", "epoch", "alpha")
METRICS = ("local_rouge_l", "global_rouge_l", "local_exact_match", "global_exact_match")
SELECT_ON = ("validation", "test")
RULE = ("Among the settings (lr, prox_lambda, epoch, alpha) whose mean global ROUGE-L on the "
        "{split} clients' global set is at least the federated prompt's minus {tol:g} points, "
        "take the one with the highest mean local ROUGE-L on those clients (ties: the first in "
        "(lr, prox_lambda, epoch, alpha) order); if none qualifies, keep the federated prompt. "
        "Report the test clients' scores at that setting.")


@dataclass(frozen=True)
class StudyGrid:
    """What `profit-ds personalize` sweeps; alpha 1 (the personalized prompt) is always scored."""

    lrs: tuple[float, ...]
    epochs: int
    opt: str = "sgd"
    prox_lambdas: tuple[float, ...] = (0.0,)
    alphas: tuple[float, ...] = ()
    select_on: str = "validation"
    tolerance: float = 1.0

    def __post_init__(self) -> None:
        """Refuse an impossible grid before a backbone is loaded."""
        if self.opt not in CLIENT_OPTIMIZERS:
            raise UsageError(f"--opt {self.opt}: expected one of {', '.join(CLIENT_OPTIMIZERS)}")
        if self.select_on not in SELECT_ON:
            raise UsageError(f"--select-on {self.select_on}: expected one of "
                             f"{', '.join(SELECT_ON)}")
        if not self.lrs or min(self.lrs) < 0:
            raise UsageError("--lrs: give one or more learning rates >= 0")
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be >= 1")
        if not self.prox_lambdas or min(self.prox_lambdas) < 0:
            raise UsageError("--prox-lambdas: give one or more lambdas >= 0")


@dataclass
class FinishedRun:
    """A finished run rebuilt: its config, backbone, encoded partition and global prompt."""

    cfg: RunConfig
    backbone: Backbone
    data: FederatedData
    prompt: torch.Tensor
    k_parallel: int
    new_tokens: int


def load_run(run_dir: Path) -> FinishedRun:
    """Rebuild the run's partition and backbone from config.json (seeded, so the same clients);
    refuse if the partition's hash differs from the one results.json recorded."""
    config_path, results_path = run_dir / "config.json", run_dir / "results.json"
    if not results_path.is_file() or not config_path.is_file():
        raise UsageError(f"{run_dir}: not a finished run (no results.json / config.json)")
    cfg = resolve(None, json.loads(config_path.read_text()))
    partition = run_partition(cfg, load_tasks(cfg))
    recorded = json.loads(results_path.read_text())["data"]["manifest_hash"]
    if partition.manifest_hash != recorded:
        raise UsageError(f"{run_dir}: the rebuilt partition differs from the run's "
                         "(data changed since the run?)")
    backbone = load_backbone(cfg.model, cfg.dtype, cfg.ds_config, cfg.trust_remote_code)
    data = encode_partition(backbone.tokenizer, partition, cfg.max_source_tokens,
                            cfg.max_target_tokens)
    prompt = read_prompt(run_dir, None, None)
    return FinishedRun(cfg, backbone, data, prompt,
                       clients_in_parallel(cfg, data, prompt.shape[0]),
                       max_new_tokens(cfg, data, backbone.tokenizer))


def flatten(record: dict) -> list[dict]:
    """One row per scored prompt of a personalization record: the personalized prompt
    (alpha 1) and its interpolations (alpha 1's interpolated copy is the same prompt; it is
    kept in the raw records as the identity check, not repeated here)."""
    base = {k: record[k] for k in ("split", "client", "lr", "prox_lambda", "epoch")}
    rows = [{**base, "alpha": 1.0, **{m: record[m] for m in METRICS}}]
    rows += [{**base, **i} for i in record.get("interpolated", []) if i["alpha"] != 1.0]
    return rows


def mean_points(records: Sequence[dict]) -> list[dict]:
    """Mean over clients of every (split, setting): the points the selection and plots use."""
    groups: dict[tuple, list[dict]] = {}
    for row in (r for rec in records for r in flatten(rec)):
        groups.setdefault((row["split"],) + tuple(row[k] for k in SETTING), []).append(row)
    return [{"split": key[0], **dict(zip(SETTING, key[1:])), "clients": len(rows),
             **{m: sum(r[m] for r in rows) / len(rows) for m in METRICS}}
            for key, rows in sorted(groups.items())]


def select(points: Sequence[dict], federated: dict[str, dict], grid: StudyGrid) -> dict:
    """Apply RULE; returns the rule's text, the chosen setting (None: the federated prompt)
    and the scores it was chosen on and is reported with."""
    floor = federated[grid.select_on]["global_rouge_l"] - grid.tolerance
    eligible = [p for p in points
                if p["split"] == grid.select_on and p["global_rouge_l"] >= floor]
    rule = RULE.format(split=grid.select_on, tol=grid.tolerance)
    if not eligible:
        return {"rule": rule, "setting": None, "chosen_on": federated[grid.select_on],
                "test": federated["test"]}
    best = max(eligible, key=lambda p: p["local_rouge_l"])
    setting = {k: best[k] for k in SETTING}
    test = next(p for p in points
                if p["split"] == "test" and all(p[k] == v for k, v in setting.items()))
    return {"rule": rule, "setting": setting, "chosen_on": best, "test": test}


def _splits(data: FederatedData, grid: StudyGrid) -> dict[str, tuple[list[ClientData], EvalSet]]:
    splits = {"test": (data.test_clients, data.global_test)}
    if grid.select_on == "validation":
        if not data.validation_clients:
            raise UsageError("--select-on validation: the run has no validation clients")
        splits["validation"] = (data.validation_clients, data.global_validation)
    return splits


def run_study(run: FinishedRun, grid: StudyGrid, reporter: Reporter | None = None) -> dict:
    """Personalize every client of each needed split with every setting; select; return
    the study dict (what study.json holds)."""
    reporter = reporter or Reporter(enabled=False)
    # SGD's proximal part multiplies p - p_global by 1 - lr * lambda: past 1 every step
    # overshoots p_global (measured: lr * lambda = 1.5 wrecked personalization, FINDINGS.md §3),
    # past 2 it diverges even without the loss
    unstable = [(lr, lam) for lr in grid.lrs for lam in grid.prox_lambdas if lr * lam > 1]
    if grid.opt == "sgd" and unstable:
        reporter.warn(f"lr x lambda > 1 for (lr, lambda) in {unstable}: SGD's proximal step "
                      "overshoots p_global there (keep lr x lambda well below 1)")
    splits = _splits(run.data, grid)
    rows = 1 + len(grid.alphas)
    total = sum((len(c.test) + len(g)) * rows * grid.epochs * len(grid.lrs) * len(grid.prox_lambdas)
                + len(c.test) for clients, g in splits.values() for c in clients)
    with reporter.task("personalization study", total) as advance:
        def score(bank: torch.Tensor, requests: Sequence[tuple[int, EvalSet]]) -> list[dict]:
            return evaluate(run.backbone, bank, requests, run.new_tokens,
                            run.cfg.eval_batch_size, advance)

        federated, records = {}, []
        for split, (clients, global_set) in splits.items():
            federated[split] = shared_prompt_scores(
                score(run.prompt.unsqueeze(0), [(0, c.test) for c in clients]), clients)
            for lam in grid.prox_lambdas:
                spec = PersonalizeSpec(ClientOptimizer(grid.opt), grid.lrs, grid.epochs,
                                       run.cfg.batch_size, run.cfg.seed, lam, grid.alphas)
                k = min(run.k_parallel, len(clients) * len(grid.lrs))
                found, _ = personalize(run.backbone, run.prompt, clients, global_set, spec, k,
                                       score)
                records += [{"split": split, "prox_lambda": lam, **r} for r in found]
    points = mean_points(records)
    return {"grid": asdict(grid), "federated": federated, "points": points,
            "selected": select(points, federated, grid), "records": records}


def study_run(run_dir: Path, grid: StudyGrid, reporter: Reporter | None = None) -> dict:
    """`profit-ds personalize`: rebuild the run, run the study, write RUN_DIR/study.json."""
    study = run_study(load_run(run_dir), grid, reporter)
    if distributed.is_main():
        io.write_json(run_dir / "study.json", study)
    return study
