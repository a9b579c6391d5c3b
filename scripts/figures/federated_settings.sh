#!/usr/bin/env bash
# Figure: the Pareto frontier of local vs global ROUGE-L over FedAvg/FedSGD x client/server
# optimizer x heterogeneity x 3 seeds, and the sweep's mean ± std table (docs/FINDINGS.md).
source "$(dirname "$0")/common.sh"
sweep
profit-ds report "$RUNS/sweep" --out "$RUNS/sweep/report" > "$RUNS/sweep/report.txt"
cp "$RUNS/sweep/report/pareto.png" "$FIGURES/federated_settings_pareto.png"
cp "$RUNS/sweep/summary.csv" "$FIGURES/federated_settings_summary.csv"
python scripts/figures/sweep_table.py "$RUNS/sweep/summary.json" > "$FIGURES/federated_settings_table.md"
cp "$RUNS/sweep/report/sweep_settings.png" "$FIGURES/federated_settings_means.png"
