"""Mean ± sample std over runs (seeds) of a personalization study's test-client points.

    python scripts/figures/study_table.py RUN_DIR [RUN_DIR...]   (each with a study.json)

Prints a Markdown table: per setting (lr, lambda, epoch, a), local and global ROUGE-L and their
change from each run's federated prompt, then the setting the validation clients selected in
each run. docs/FINDINGS.md quotes these tables.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from statistics import mean, stdev

from profit_ds.selection import SETTING


def spread(values: list[float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    text = f"{mean(values):{sign}.1f}"
    return text + (f" ± {stdev(values):.1f}" if len(values) > 1 else "")


def main(run_dirs: list[str]) -> None:
    studies = [json.loads((Path(d) / "study.json").read_text()) for d in run_dirs]
    rows: dict[tuple, list[tuple[dict, dict]]] = {}
    for study in studies:
        federated = study["federated"]["test"]
        for point in study["points"]:
            if point["split"] == "test":
                rows.setdefault(tuple(point[k] for k in SETTING), []).append((point, federated))
    print(f"Test clients, mean ± std over {len(studies)} runs "
          f"(change: from the run's federated prompt)\n")
    print("| " + " | ".join(SETTING) + " | local ROUGE-L | change | global ROUGE-L | change |")
    print("|" + "---:|" * (len(SETTING) + 4))
    for key, pairs in sorted(rows.items()):
        cells = [f"{v:g}" for v in key]
        for metric in ("local_rouge_l", "global_rouge_l"):
            cells += [spread([p[metric] for p, _ in pairs]),
                      spread([p[metric] - f[metric] for p, f in pairs], signed=True)]
        print("| " + " | ".join(cells) + " |")
    print("\nSelected on the validation clients (one per run): " + "; ".join(
        "federated prompt" if s["selected"]["setting"] is None else
        ", ".join(f"{k} {v:g}" for k, v in s["selected"]["setting"].items())
        for s in studies))


if __name__ == "__main__":
    main(sys.argv[1:])
