# Sourced by the figure scripts: the findings sweep (docs/findings/sweep.yaml) is the source of
# every run; re-running it skips finished cells, so each figure script can start from scratch
# or reuse what another one ran.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/findings}
FIGURES=docs/findings
SEEDS=(0 1 2)

sweep() {
    profit-ds sweep --config docs/findings/sweep.yaml --output-dir "$RUNS/sweep"
}

# study_copy NAME SEED: a copy of the default setting's run of SEED, for one personalization
# study (each study writes its own study.json into the run directory it is given).
study_copy() {
    local src="$RUNS/sweep/fedavg-adam__heterogeneity=task/seed-$2" dst="$RUNS/$1/seed-$2"
    if [[ ! -f "$dst/results.json" ]]; then
        mkdir -p "$(dirname "$dst")" && rm -rf "$dst" && cp -r "$src" "$dst"
    fi
    echo "$dst"
}
