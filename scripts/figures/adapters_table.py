"""A sweep's summary.json as the prompt-vs-LoRA table of docs/FINDINGS.md §7.

    python scripts/figures/adapters_table.py OUTPUT_DIR/summary.json

One row per setting: the bare backbone's global ROUGE-L (the reference), the federated
state's local and global ROUGE-L, then each of the setting's own personalization lrs after its
last epoch (adapters take different lr grids, so each cell names its lr), local / global;
mean ± sample std over the seeds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from sweep_table import cell


def main(path: str) -> None:
    groups = json.loads(Path(path).read_text())["groups"]
    width = max(len(g["personalized"]) for g in groups)
    header = ["setting", "seeds", "backbone global", "federated local", "federated global",
              *(f"personalized #{i + 1}: lr, local / global" for i in range(width))]
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for g in groups:
        row = [g["setting"] or g["label"], str(g["n"]), cell(g["backbone_global_rouge_l"]),
               cell(g["federated_local_rouge_l"]), cell(g["federated_global_rouge_l"])]
        row += [f"lr {p['lr']:g}: {cell(p['local_rouge_l'])} / {cell(p['global_rouge_l'])}"
                for p in g["personalized"]]
        print("| " + " | ".join(row + [""] * (len(header) - len(row))) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
