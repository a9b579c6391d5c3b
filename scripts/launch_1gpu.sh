#!/usr/bin/env bash
# One GPU: llama-7b, FedSGD, bf16 ZeRO-3 (one rank holds the whole 13.5 GB backbone).
# Check the memory first:  profit-ds plan --model llama-7b --gpus 1
# Override by environment (MODEL, ALGO, K, DS_CONFIG, OUTPUT_DIR); extra flags go to `run`:
#   K=2 scripts/launch_1gpu.sh --rounds 50 --data /data/natural-instructions
set -euo pipefail

MODEL=${MODEL:-llama-7b}
ALGO=${ALGO:-fedsgd}
K=${K:-auto}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_gpu_bf16.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${MODEL}-${ALGO}-1gpu}

# --module runs `python -m profit_ds`; --no_local_rank: ranks read LOCAL_RANK from the environment.
exec deepspeed --num_gpus 1 --module --no_local_rank profit_ds run \
  --model "$MODEL" --algo "$ALGO" --dtype bf16 --ds-config "$DS_CONFIG" \
  --clients-in-parallel "$K" --output-dir "$OUTPUT_DIR" "$@"
