#!/usr/bin/env bash
# Figure: proximal regularization (lambda) and interpolation (a) of personalization with few
# local steps (1-2 epochs at SGD lr 30 and 300), from the default run's federated prompt
# (3 seeds; docs/FINDINGS.md). SGD's proximal step is stable for lr x lambda < 2.
source "$(dirname "$0")/common.sh"
sweep
runs=()
for seed in "${SEEDS[@]}"; do
    run=$(study_copy regularization "$seed")
    [[ -f "$run/study.json" ]] || profit-ds personalize "$run" --lrs 30,300 --epochs 2 \
        --prox-lambdas 0,0.001,0.005 --interp-alphas 0,0.5,1
    runs+=("$run")
done
profit-ds report "${runs[@]}" --out "$RUNS/regularization/report" > "$RUNS/regularization/report.txt"
cp "$RUNS/regularization/report/seed-0_regularization.png" "$FIGURES/regularization_seed0.png"
cp "$RUNS/regularization/report/seed-0_interpolation.png" "$FIGURES/interpolation_seed0.png"
python scripts/figures/study_table.py "${runs[@]}" > "$FIGURES/regularization_table.md"
