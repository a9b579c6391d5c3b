"""PNG plots and a CSV of every scored point, from finished runs (and their study.json).

Why these plots: Profit's finding is a trade-off, so most plots put global ROUGE-L
(robustness) on x and local ROUGE-L (personalization) on y, with the federated prompt as the
reference point; the rounds plot shows whether federated training itself converged. Across
runs (a sweep's settings and seeds) the Pareto plot shows which settings no other setting beats
on both axes at once: the choices worth making, whatever weight one gives to either side.
Matplotlib runs on the Agg backend, so no display is needed.
"""
from __future__ import annotations

import csv
import io as _io
import itertools
import json
import re
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
from profit_ds.selection import SETTING

CSV_COLUMNS = ("run", "source", "split", "client", "lr", "prox_lambda", "epoch", "alpha",
               "local_rouge_l", "global_rouge_l", "local_exact_match", "global_exact_match",
               "on_pareto_front")
# The points a reader chooses among: a prompt's mean over the test clients at one setting
# (not one client's scores, not the validation clients the study selects on).
SETTING_SOURCES = ("federated", "personalized", "study")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
TRADEOFF_AXES = ("global ROUGE-L (global test set)", "local ROUGE-L (own test set)")


@dataclass
class RunFiles:
    """A finished run's results.json, and its study.json when `personalize` was run."""

    name: str
    results: dict
    study: dict | None

    @property
    def prefix(self) -> str:
        return file_safe(self.name)


def file_safe(name: str) -> str:
    """A run name as a file-name prefix: a run found below a directory is named by its
    relative path (`fedavg-adam/seed-0`), which must not become subdirectories of --out."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def read_run(run_dir: Path, name: str | None = None) -> RunFiles:
    path = run_dir / "results.json"
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a finished run (no results.json)")
    study_path = run_dir / "study.json"
    study = json.loads(study_path.read_text()) if study_path.is_file() else None
    return RunFiles(name or run_dir.resolve().name, json.loads(path.read_text()), study)


def find_runs(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Each path's run, or the runs below it (a sweep's OUT/<setting>/seed-<n>/), in sorted
    order, each with a readable name unique among all of them.

    A run given directly is named by its directory, one found below a path by its path
    relative to it; names that still collide (two `seed-0` runs given directly) take parent
    directories until they differ. A run reached twice is reported once.
    """
    found: dict[Path, int] = {}  # resolved run dir -> how many trailing path parts name it
    for path in paths:
        if (path / "results.json").is_file():
            found.setdefault(path.resolve(), 1)
            continue
        below = sorted(p.parent for p in path.glob("**/results.json")) if path.is_dir() else []
        if not below:
            raise UsageError(f"{path}: not a finished run and no runs below it "
                             "(no results.json)")
        for run in below:
            found.setdefault(run.resolve(), len(run.relative_to(path).parts))

    def name(run: Path) -> str:
        return "/".join(run.parts[-found[run]:])
    while True:
        by_prefix: dict[str, list[Path]] = {}
        for run in found:
            by_prefix.setdefault(file_safe(name(run)), []).append(run)
        clashes = [run for runs in by_prefix.values() if len(runs) > 1 for run in runs
                   if found[run] < len(run.parts) - 1]
        if not clashes:
            return [(run, name(run)) for run in found]
        for run in clashes:
            found[run] += 1


def _figure(path: Path, title: str, draw: Callable[[Axes], None],
            size: tuple[float, float] = (6.4, 4.8)) -> Path:
    """One titled figure with a legend, saved to `path`, closed (figures hold memory)."""
    fig, ax = plt.subplots(figsize=size)
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


def _tradeoff_curves(ax: Axes, points: Sequence[dict], federated: dict) -> None:
    """One curve per lr through its epochs, each starting at the federated prompt (epoch 0)."""
    for lr in sorted({r["lr"] for r in points}):
        rows = sorted((r for r in points if r["lr"] == lr), key=lambda r: r["epoch"])
        _curve(ax, [{**federated, "epoch": 0}] + rows, f"lr {lr:g} (labels: epoch)", "epoch")
    _federated_point(ax, federated)
    _tradeoff_axes(ax)


def plot_tradeoff(run: RunFiles, path: Path) -> Path:
    """The run's own personalization grid (results.json): one curve per lr through its epochs."""
    return _figure(path, f"{run.name}: personalization trade-off (mean over test clients)",
                   lambda ax: _tradeoff_curves(ax, run.results["personalized"],
                                               run.results["global"]))


def plot_study_tradeoff(run: RunFiles, path: Path) -> Path:
    """The study's lr x epoch grid (study.json, usually wider than the run's), on the test
    clients, plain personalization: the smallest proximal weight (0 when in the grid) and the
    personalized prompt itself (a = 1)."""
    points = [p for p in run.study["points"] if p["split"] == "test" and p["alpha"] == 1]
    lam = min(p["prox_lambda"] for p in points)
    points = [p for p in points if p["prox_lambda"] == lam]
    suffix = "" if lam == 0 else f", lambda {lam:g}"
    return _figure(path, f"{run.name}: personalization study{suffix} (test clients)",
                   lambda ax: _tradeoff_curves(ax, points, run.study["federated"]["test"]))


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


MARKERS = ("o", "s", "^", "D", "v", "P")


def sweep_points(summary: dict) -> list[dict]:
    """A sweep's summary.json as plot points: per group, the federated prompt and each
    personalization lr after its last epoch, with mean and std over seeds of both scores."""
    points = []
    for g in summary["groups"]:
        name = g["setting"] or g["label"]
        rows = [("federated", g["federated_global_rouge_l"], g["federated_local_rouge_l"])]
        rows += [(f"lr {p['lr']:g}", p["global_rouge_l"], p["local_rouge_l"])
                 for p in g["personalized"]]
        points += [{"group": name, "kind": kind, "label": f"{name}, {kind}",
                    "global": glob, "local": local} for kind, glob, local in rows]
    return points


def plot_sweep_means(summary: dict, path: Path) -> Path:
    """Every setting of a sweep as mean ± std over its seeds (one colour per setting, one
    marker per prompt), and the Pareto frontier of those means: with a dozen runs the per-run
    Pareto plot is too busy to read, and a single seed's point says little on its own."""
    points = sweep_points(summary)
    kinds = list(dict.fromkeys(p["kind"] for p in points))
    colors = dict(zip(dict.fromkeys(p["group"] for p in points), itertools.cycle(
        plt.cm.tab10.colors)))
    marker = {k: "*" if k == "federated" else MARKERS[i % len(MARKERS)]
              for i, k in enumerate(kinds)}

    def draw(ax: Axes) -> None:
        for p in points:
            ax.errorbar(p["global"]["mean"], p["local"]["mean"], xerr=p["global"]["std"] or 0,
                        yerr=p["local"]["std"] or 0, fmt=marker[p["kind"]],
                        color=colors[p["group"]], alpha=0.85, elinewidth=0.8, capsize=2,
                        markersize=12 if p["kind"] == "federated" else 7,
                        markeredgecolor="black")
        for group, color in colors.items():
            ax.plot([], [], "s", color=color, label=group)
        for kind in kinds:
            ax.plot([], [], marker[kind], color="gray", markeredgecolor="black",
                    label="federated prompt" if kind == "federated" else f"personalized, {kind}")
        xy = [(p["global"]["mean"], p["local"]["mean"]) for p in points]
        front = pareto_front(xy)
        ax.step([xy[i][0] for i in front], [xy[i][1] for i in front], where="post",
                color="black", linewidth=1, label="Pareto frontier (means)")
        for i in front:
            ax.annotate(points[i]["label"], xy[i], textcoords="offset points", xytext=(6, 4),
                        fontsize=7)
        _tradeoff_axes(ax)
        ax.legend(fontsize="small", loc="upper left")
    return _figure(path, "Sweep: mean ± std over seeds (personalized: last epoch)", draw,
                   size=(8.0, 6.0))


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


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (maximizing both coordinates), in
    increasing first coordinate (so decreasing second): the frontier in drawing order.

    A point is dominated by one at least as good on both coordinates and better on one; so of
    several identical points all stay on the front, and of points tied on one coordinate only
    the best on the other can. One sweep over the points sorted by decreasing first
    coordinate: O(n log n) where the brute-force check is O(n^2).
    """
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")  # the highest second coordinate among larger first coordinates
    for _, same_x in itertools.groupby(order, key=lambda i: points[i][0]):
        tied = list(same_x)
        top = points[tied[0]][1]
        if top > best:
            front += [i for i in tied if points[i][1] == top]
            best = top
    return front[::-1]


def _is_setting(row: dict) -> bool:
    return row["source"] in SETTING_SOURCES and row["split"] == "test"


def mark_pareto_front(rows: Sequence[dict]) -> list[dict]:
    """`rows` with `on_pareto_front` set, over all of them at once (all runs given): True or
    False for the settings' points (SETTING_SOURCES on the test clients), empty for the
    others, which are not settings one could choose."""
    settings = [i for i, r in enumerate(rows) if _is_setting(r)]
    front = {settings[j] for j in pareto_front(
        [(rows[i]["global_rouge_l"], rows[i]["local_rouge_l"]) for i in settings])}
    flags = {i: i in front for i in settings}
    return [{**r, "on_pareto_front": flags.get(i, "")} for i, r in enumerate(rows)]


def _setting_label(row: dict, with_run: bool) -> str:
    """A short name of the setting behind a point: `run: lr 5, ep 1` (study points add lambda
    and alpha)."""
    if row["source"] == "federated":
        setting = "federated"
    else:
        setting = f"lr {row['lr']:g}, ep {row['epoch']}"
        if row["source"] == "study":
            setting += f", λ {row['prox_lambda']:g}, α {row['alpha']:g}"
    return f"{row['run']}: {setting}" if with_run else setting


def plot_pareto(rows: Sequence[dict], path: Path) -> Path:
    """Every setting's point of every run (federated prompts as stars), one colour and
    marker per run, and the non-dominated frontier as a step line with its settings named.

    `rows` are mark_pareto_front's. The step line is the upper-right boundary of what the
    frontier attains: at any global ROUGE-L, the best local ROUGE-L some setting reaches
    without doing worse globally.
    """
    points = [r for r in rows if r["on_pareto_front"] != ""]
    runs = list(dict.fromkeys(r["run"] for r in points))

    def draw(ax: Axes) -> None:
        for k, run in enumerate(runs):
            colour, marker = f"C{k % 10}", MARKERS[k % len(MARKERS)]
            mine = [r for r in points if r["run"] == run]
            tuned = [r for r in mine if r["source"] != "federated"]
            ax.scatter([r["global_rouge_l"] for r in tuned], [r["local_rouge_l"] for r in tuned],
                       color=colour, marker=marker, alpha=0.6, label=run)
            fed = [r for r in mine if r["source"] == "federated"]
            ax.scatter([r["global_rouge_l"] for r in fed], [r["local_rouge_l"] for r in fed],
                       color=colour, marker="*", s=200, edgecolors="black", zorder=3)
        ax.scatter([], [], marker="*", s=200, color="white", edgecolors="black",
                   label="federated prompt")
        front = [r for r in points if r["on_pareto_front"]]
        front.sort(key=lambda r: (r["global_rouge_l"], -r["local_rouge_l"]))
        ax.step([r["global_rouge_l"] for r in front], [r["local_rouge_l"] for r in front],
                where="pre", color="black", linewidth=1, zorder=2, label="Pareto frontier")
        # identical points get one label, counting the others; labels alternate above and
        # below the line, and point inwards on the right half (else they leave the figure)
        same = [(xy, list(tied)) for xy, tied in itertools.groupby(
            front, key=lambda r: (r["global_rouge_l"], r["local_rouge_l"]))]
        for k, (xy, tied) in enumerate(same):
            more = f" (+{len(tied) - 1})" if len(tied) > 1 else ""
            right = k >= len(same) / 2
            ax.annotate(_setting_label(tied[0], len(runs) > 1) + more, xy, fontsize="x-small",
                        xytext=(-4 if right else 4, 4 if k % 2 == 0 else -10),
                        textcoords="offset points", ha="right" if right else "left")
        _tradeoff_axes(ax)
        ax.legend(fontsize="x-small", ncol=1 + len(runs) // 12)
    return _figure(path, "Pareto frontier of all settings (mean over test clients)", draw,
                   size=(9.6, 7.2))


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(path, buf.getvalue())
    return path


def write_report(runs: Sequence[RunFiles], out: Path,
                 sweeps: Sequence[tuple[str, dict]] = ()) -> list[Path]:
    """All plots of every run (file names prefixed by its file-safe name), the Pareto plot over
    all runs, one points.csv with every point flagged on or off the frontier, and for each
    (name, summary.json) of `sweeps` its settings' means over seeds."""
    out.mkdir(parents=True, exist_ok=True)
    written = [plot_sweep_means(summary, out / f"{file_safe(name)}_settings.png")
               for name, summary in sweeps]
    for run in runs:
        prefix = out / run.prefix
        written += [plot_tradeoff(run, Path(f"{prefix}_tradeoff.png")),
                    plot_rounds(run, Path(f"{prefix}_rounds.png")),
                    plot_clients(run, Path(f"{prefix}_clients.png"))]
        grid = run.study["grid"] if run.study else {}
        if run.study:
            written.append(plot_study_tradeoff(run, Path(f"{prefix}_study_tradeoff.png")))
        if len(grid.get("prox_lambdas", ())) > 1:
            written.append(plot_study(run, Path(f"{prefix}_regularization.png"), "prox_lambda",
                                      "proximal regularization"))
        if grid.get("alphas"):
            written.append(plot_study(run, Path(f"{prefix}_interpolation.png"), "alpha",
                                      "interpolation"))
    rows = mark_pareto_front([r for run in runs for r in csv_rows(run)])
    written.append(plot_pareto(rows, out / "pareto.png"))
    written.append(write_csv(out / "points.csv", rows))
    return written
