#!/usr/bin/env bash
# Table: the default setting under task, iid and dirichlet:0.5 partitions, 3 seeds each
# (docs/FINDINGS.md §4); the task cells come from the federated-settings sweep.
source "$(dirname "$0")/common.sh"
sweep
profit-ds sweep --config docs/findings/heterogeneity.yaml --output-dir "$RUNS/heterogeneity"
python scripts/figures/sweep_table.py "$RUNS/sweep/summary.json" "$RUNS/heterogeneity/summary.json" \
    > "$FIGURES/heterogeneity_table.md"
