"""Local vs global ROUGE-L of every setting of a sweep, mean over seeds with ±1 std bars, and
the Pareto frontier over those means (the per-run frontier of `profit-ds report` is too busy
to read once there are a dozen runs).

    python scripts/figures/sweep_pareto.py OUTPUT_DIR/summary.json OUT.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from profit_ds.plots import pareto_front  # noqa: E402

MARKERS = {"federated": "*", 0: "o", 1: "s", 2: "^", 3: "D"}


def main(summary_path: str, out: str) -> None:
    groups = json.loads(Path(summary_path).read_text())["groups"]
    points, labels = [], []
    fig, ax = plt.subplots(figsize=(8.0, 6.0))
    for color, g in zip(plt.cm.tab10.colors, groups):
        name = g["setting"] or g["label"]
        rows = [("federated", g["federated_global_rouge_l"], g["federated_local_rouge_l"])]
        rows += [(i, p["global_rouge_l"], p["local_rouge_l"])
                 for i, p in enumerate(g["personalized"])]
        for kind, glob, local in rows:
            ax.errorbar(glob["mean"], local["mean"], xerr=glob["std"] or 0,
                        yerr=local["std"] or 0, fmt=MARKERS[kind], color=color,
                        markersize=12 if kind == "federated" else 7, alpha=0.85,
                        elinewidth=0.8, capsize=2, markeredgecolor="black")
            points.append((glob["mean"], local["mean"]))
            labels.append(f"{name}, " + ("federated" if kind == "federated" else
                                         f"lr {g['personalized'][kind]['lr']:g}"))
        ax.plot([], [], "s", color=color, label=name)
    kinds = [("federated", "federated prompt")] + [
        (i, f"personalized, lr {p['lr']:g}") for i, p in enumerate(groups[0]["personalized"])]
    for kind, text in kinds:
        ax.plot([], [], MARKERS[kind], color="gray", markeredgecolor="black", label=text)
    front = pareto_front(points)
    ax.step([points[i][0] for i in front], [points[i][1] for i in front], where="post",
            color="black", linewidth=1, label="Pareto frontier (means)")
    for i in front:
        ax.annotate(labels[i], points[i], textcoords="offset points", xytext=(6, 4),
                    fontsize=7)
    epoch = groups[0]["personalized"][0]["epoch"]
    ax.set_xlabel("global ROUGE-L (global test set)")
    ax.set_ylabel("local ROUGE-L (own test set)")
    ax.set_title(f"Federated settings: mean ± std over seeds (personalized: epoch {epoch})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
