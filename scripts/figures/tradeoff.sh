#!/usr/bin/env bash
# Figure: personalization's local vs global ROUGE-L, one curve per learning rate through 6
# epochs, from the default run's federated prompt (3 seeds; docs/FINDINGS.md).
source "$(dirname "$0")/common.sh"
sweep
runs=()
for seed in "${SEEDS[@]}"; do
    run=$(study_copy tradeoff "$seed")
    [[ -f "$run/study.json" ]] || profit-ds personalize "$run" --lrs 1,10,100,300 --epochs 6
    runs+=("$run")
done
profit-ds report "${runs[@]}" --out "$RUNS/tradeoff/report" > "$RUNS/tradeoff/report.txt"
cp "$RUNS/tradeoff/report/seed-0_study_tradeoff.png" "$FIGURES/tradeoff_seed0.png"
cp "$RUNS/tradeoff/report/seed-0_rounds.png" "$FIGURES/rounds_seed0.png"
cp "$RUNS/tradeoff/report/pareto.png" "$FIGURES/tradeoff_pareto.png"
python scripts/figures/study_table.py "${runs[@]}" > "$FIGURES/tradeoff_table.md"
