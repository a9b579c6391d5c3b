#!/usr/bin/env bash
# docs/FINDINGS.md §7: prompt tuning vs LoRA (fedit, ffa, fedsa) at matched budgets, 3 seeds,
# on the built-in default (docs/findings/adapters.yaml, about 17 minutes on 2 CPU cores).
source "$(dirname "$0")/common.sh"
profit-ds sweep --config docs/findings/adapters.yaml --output-dir "$RUNS/adapters"
python scripts/figures/adapters_table.py "$RUNS/adapters/summary.json" > "$FIGURES/adapters_table.md"
profit-ds report "$RUNS/adapters" --out "$RUNS/adapters/report" > "$RUNS/adapters/report.txt"
cp "$RUNS/adapters/report/pareto.png" "$FIGURES/adapters_pareto.png"
