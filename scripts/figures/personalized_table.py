"""Mean ± sample std over runs (seeds) of `profit-ds run`'s personalization, every lr and epoch.

    python scripts/figures/personalized_table.py RUN_DIR [RUN_DIR...]   (each with results.json)

A sweep's summary keeps each lr's last epoch only (sweep_table.py); the trade-off between
personalization and robustness is in how the scores move epoch by epoch. Prints a Markdown
table: per (lr, epoch), the test clients' mean local and global ROUGE-L and their change from
each run's federated prompt. docs/FINDINGS.md quotes these tables.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from study_table import spread


def main(run_dirs: list[str]) -> None:
    results = [json.loads((Path(d) / "results.json").read_text()) for d in run_dirs]
    rows: dict[tuple[float, int], list[tuple[dict, dict]]] = {}
    for r in results:
        for point in r["personalized"]:
            rows.setdefault((point["lr"], point["epoch"]), []).append((point, r["global"]))
    print(f"Test clients, mean ± std over {len(results)} runs "
          f"(change: from the run's federated prompt)\n")
    print("| lr | epoch | local ROUGE-L | change | global ROUGE-L | change |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (lr, epoch), pairs in sorted(rows.items()):
        cells = [f"{lr:g}", str(epoch)]
        for metric in ("local_rouge_l", "global_rouge_l"):
            cells += [spread([p[metric] for p, _ in pairs]),
                      spread([p[metric] - f[metric] for p, f in pairs], signed=True)]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
