"""PNG plots and a CSV of every scored point, from finished runs (and their study.json).

Why these plots: Profit's finding is a trade-off, so most plots put global ROUGE-L
(robustness) on x and local ROUGE-L (personalization) on y, with the federated prompt as the
reference point; the rounds plot shows whether federated training itself converged.
Matplotlib runs on the Agg backend, so no display is needed.
"""
from __future__ import annotations

import csv
import io as _io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display needed
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from profit_ds import io
from profit_ds.errors import UsageError
from profit_ds.study import SETTING

CSV_COLUMNS = ("run", "source", "split", "client", "lr", "prox_lambda", "epoch", "alpha",
               "local_rouge_l", "global_rouge_l", "local_exact_match", "global_exact_match")
TRADEOFF_AXES = ("global ROUGE-L (global test set)", "local ROUGE-L (own test set)")


@dataclass
class RunFiles:
    """A finished run's results.json, and its study.json when `personalize` was run."""

    name: str
    results: dict
    study: dict | None


def read_run(run_dir: Path) -> RunFiles:
    path = run_dir / "results.json"
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a finished run (no results.json)")
    study_path = run_dir / "study.json"
    study = json.loads(study_path.read_text()) if study_path.is_file() else None
    return RunFiles(run_dir.resolve().name, json.loads(path.read_text()), study)


def _figure(path: Path, title: str, draw: Callable[[Axes], None]) -> Path:
    """One titled figure with a legend, saved to `path`, closed (figures hold memory)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    draw(ax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend() is None:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _federated_point(ax: Axes, scores: dict, label: str = "federated prompt") -> None:
    ax.scatter([scores["global_rouge_l"]], [scores["local_rouge_l"]], marker="*", s=200,
               color="black", zorder=3, label=label)


def _tradeoff_axes(ax: Axes) -> None:
    ax.set_xlabel(TRADEOFF_AXES[0])
    ax.set_ylabel(TRADEOFF_AXES[1])


def _curve(ax: Axes, rows: Sequence[dict], label: str, annotate: str) -> None:
    """Points of one trade-off curve in order, each labelled with its `annotate` value."""
    xs, ys = [r["global_rouge_l"] for r in rows], [r["local_rouge_l"] for r in rows]
    ax.plot(xs, ys, marker="o", label=label)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(f"{r[annotate]:g}", (x, y), fontsize="x-small", xytext=(3, 3),
                    textcoords="offset points")


def plot_tradeoff(run: RunFiles, path: Path) -> Path:
    """One curve per personalization lr through its epochs, from the federated prompt."""
    def draw(ax: Axes) -> None:
        for lr in sorted({r["lr"] for r in run.results["personalized"]}):
            start = {**run.results["global"], "epoch": 0}
            rows = [start] + [r for r in run.results["personalized"] if r["lr"] == lr]
            _curve(ax, rows, f"lr {lr:g} (labels: epoch)", "epoch")
        _federated_point(ax, run.results["global"])
        _tradeoff_axes(ax)
    return _figure(path, f"{run.name}: personalization trade-off (mean over test clients)", draw)


def plot_rounds(run: RunFiles, path: Path) -> Path:
    """Validation ROUGE-L and training loss per federated round (two y axes)."""
    rounds = run.results["rounds"]

    def draw(ax: Axes) -> None:
        scored = [r for r in rounds if "val_rouge_l" in r]
        ax.plot([r["round"] for r in scored], [r["val_rouge_l"] for r in scored], marker="o",
                color="tab:blue", label="validation ROUGE-L")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("global validation ROUGE-L")
        loss = ax.twinx()
        loss.plot([r["round"] for r in rounds], [r["train_loss"] for r in rounds], marker="s",
                  color="tab:red", label="train loss")
        loss.set_ylabel("mean client training loss")
        handles = ax.get_legend_handles_labels()[0] + loss.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize="small")
    return _figure(path, f"{run.name}: federated training", draw)


def plot_clients(run: RunFiles, path: Path) -> Path:
    """Each test client's local vs global ROUGE-L after the last epoch, one colour per lr."""
    records = run.results["personalized_clients"]
    last = max((r["epoch"] for r in records), default=0)

    def draw(ax: Axes) -> None:
        for lr in sorted({r["lr"] for r in records}):
            rows = [r for r in records if r["lr"] == lr and r["epoch"] == last]
            ax.scatter([r["global_rouge_l"] for r in rows], [r["local_rouge_l"] for r in rows],
                       alpha=0.7, label=f"lr {lr:g}, epoch {last}")
        _federated_point(ax, run.results["global"], "federated prompt (mean)")
        _tradeoff_axes(ax)
    return _figure(path, f"{run.name}: per test client", draw)


def _selected_slice(study: dict, vary: str) -> list[dict]:
    """Test points along `vary` with the other settings at the selected (or first) values."""
    points = [p for p in study["points"] if p["split"] == "test"]
    fixed = study["selected"]["setting"] or {k: points[0][k] for k in SETTING}
    return [p for p in points if all(p[k] == v for k, v in fixed.items() if k != vary)]


def plot_study(run: RunFiles, path: Path, vary: str, what: str) -> Path:
    """Regularization (vary=prox_lambda) or interpolation (vary=alpha) curve on the test
    clients, the other settings held at the selected ones."""
    sel = run.study["selected"]["setting"]
    held = ", ".join(f"{k} {v:g}" for k, v in (sel or {}).items() if k != vary)

    def draw(ax: Axes) -> None:
        _curve(ax, _selected_slice(run.study, vary), f"{what} ({held}; labels: {vary})", vary)
        _federated_point(ax, run.study["federated"]["test"])
        _tradeoff_axes(ax)
    return _figure(path, f"{run.name}: {what} (test clients)", draw)


def csv_rows(run: RunFiles) -> list[dict]:
    """Every scored point of a run: federated, personalized means, per client, study points."""
    fed = run.results["global"]
    rows = [{"source": "federated", "split": "test", **fed}]
    rows += [{"source": "personalized", "split": "test", **r} for r in run.results["personalized"]]
    rows += [{"source": "personalized_client", "split": "test", **r}
             for r in run.results["personalized_clients"]]
    if run.study:
        rows += [{"source": "study", **p} for p in run.study["points"]]
    return [{c: ({"run": run.name, **r}).get(c, "") for c in CSV_COLUMNS} for r in rows]


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(path, buf.getvalue())
    return path


def write_report(runs: Sequence[RunFiles], out: Path) -> list[Path]:
    """All plots of every run (file names prefixed by the run's name) and one points.csv."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for run in runs:
        prefix = out / run.name
        written += [plot_tradeoff(run, Path(f"{prefix}_tradeoff.png")),
                    plot_rounds(run, Path(f"{prefix}_rounds.png")),
                    plot_clients(run, Path(f"{prefix}_clients.png"))]
        grid = run.study["grid"] if run.study else {}
        if len(grid.get("prox_lambdas", ())) > 1:
            written.append(plot_study(run, Path(f"{prefix}_regularization.png"), "prox_lambda",
                                      "proximal regularization"))
        if grid.get("alphas"):
            written.append(plot_study(run, Path(f"{prefix}_interpolation.png"), "alpha",
                                      "interpolation"))
    written.append(write_csv(out / "points.csv", [r for run in runs for r in csv_rows(run)]))
    return written
