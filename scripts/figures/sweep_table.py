"""Sweeps' summary.json files as one Markdown table, as docs/FINDINGS.md quotes them.

    python scripts/figures/sweep_table.py OUTPUT_DIR/summary.json [MORE/summary.json...]

One row per group (setting + grid values): initial and federated global ROUGE-L, then for each
personalization lr after its last epoch the local and global ROUGE-L; mean ± sample std over
the seeds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(s: dict) -> str:
    return f"{s['mean']:.1f}" + ("" if s["std"] is None else f" ± {s['std']:.1f}")


def main(paths: list[str]) -> None:
    groups = [g for path in paths for g in json.loads(Path(path).read_text())["groups"]]
    lrs = [p["lr"] for p in groups[0]["personalized"]]
    keys = list(groups[0]["grid"])
    backbone = all("backbone_global_rouge_l" in g for g in groups)  # runs since it is scored
    header = (["setting", *keys, "seeds", *(["backbone global"] if backbone else []),
               "initial global", "federated global"]
              + [f"lr {lr:g}: {m}" for lr in lrs for m in ("local", "global")])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * (len(keys) + 1) + "---:|" * (len(header) - len(keys) - 1))
    for g in groups:
        row = [g["setting"] or g["label"], *(str(g["grid"][k]) for k in keys), str(g["n"]),
               *([cell(g["backbone_global_rouge_l"])] if backbone else []),
               cell(g["initial_global_rouge_l"]), cell(g["federated_global_rouge_l"])]
        for p in g["personalized"]:
            row += [cell(p["local_rouge_l"]), cell(p["global_rouge_l"])]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
