"""The personalization study on a finished run (issue 5): a grid of learning rates x epochs x
proximal lambdas x interpolation weights, with the setting chosen as the paper does.

Why validation clients: picking the setting that looks best on the test clients reports an
optimistic number. The paper personalizes the (held-out) validation clients with every
setting, picks one by their local and global validation scores, and reports the test
clients' scores at that setting. `select_on="test"` (oracle selection) exists only to measure
that optimism; the output records which one was used and the rule's exact wording. The grid,
its points and the rule are pure functions in `profit_ds.selection`; this module runs them.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from profit_ds import distributed, io
from profit_ds.config import RunConfig, resolve
from profit_ds.data.for_run import load_tasks, run_partition
from profit_ds.errors import UsageError
from profit_ds.evaluation.generate import evaluate
from profit_ds.adapters.base import Adapter
from profit_ds.export import read_state
from profit_ds.fl.clients import ClientData, EvalSet, FederatedData
from profit_ds.fl.optim import ClientOptimizer
from profit_ds.fl.personalize import PersonalizeSpec, personalize, scored_rows
from profit_ds.fl.state import State, expand
from profit_ds.model.backbone import Backbone
from profit_ds.report import Reporter
from profit_ds.memory import Budgets
from profit_ds.runner import set_up, shared_prompt_scores
from profit_ds.selection import StudyGrid, mean_points, select


@dataclass
class FinishedRun:
    """A finished run rebuilt: its config, backbone, encoded partition, adapter and global
    state."""

    cfg: RunConfig
    backbone: Backbone
    data: FederatedData
    adapter: Adapter
    model: State
    budgets: Budgets
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
    setup = set_up(cfg, partition)
    return FinishedRun(cfg, setup.backbone, setup.data, setup.adapter,
                       read_state(run_dir, setup.adapter.name, None, None), setup.budgets,
                       setup.new_tokens)


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
        def score(bank: State, requests: Sequence[tuple[int, EvalSet]],
                  tags: Sequence[dict] = ()) -> list[dict]:
            return evaluate(run.backbone, bank, requests, run.new_tokens,
                            run.budgets.generation_rows, advance, run.adapter,
                            run.budgets.generation_tokens)

        federated, records = {}, []
        for split, (clients, global_set) in splits.items():
            federated[split] = shared_prompt_scores(
                score(expand(run.model, 1), [(0, c.test) for c in clients]),
                clients)
            # the whole (client, lr, lambda) grid is one bank: lr and lambda are per row
            spec = PersonalizeSpec(ClientOptimizer(grid.opt), grid.lrs, grid.epochs,
                                   run.cfg.batch_size, run.cfg.seed, grid.prox_lambdas,
                                   grid.alphas, run.adapter)
            k = run.budgets.personalization_group(
                scored_rows(clients, global_set, spec),
                len(clients) * len(grid.lrs) * len(grid.prox_lambdas))
            found, _ = personalize(run.backbone, run.model, clients, global_set,
                                   spec, k, score)
            records += [{"split": split, **r} for r in found]
    points = mean_points(records)
    return {"grid": asdict(grid), "federated": federated, "points": points,
            "selected": select(points, federated, grid), "records": records}


def study_run(run_dir: Path, grid: StudyGrid, reporter: Reporter | None = None) -> dict:
    """`profit-ds personalize`: rebuild the run, run the study, write RUN_DIR/study.json."""
    study = run_study(load_run(run_dir), grid, reporter)
    if distributed.is_main():
        io.write_json(run_dir / "study.json", study)
    return study
