#!/usr/bin/env bash
# Eight GPUs on one node: llama-7b, FedSGD, bf16 ZeRO-3 sharded 8 ways (about 1.7 GB of
# weights per GPU), NCCL. Every rank runs the same loop on its slice of each batch.
# Check the memory first:  profit-ds plan --model llama-7b --gpus 8
# Override by environment (MODEL, ALGO, K, NUM_GPUS, DS_CONFIG, OUTPUT_DIR); extra flags go
# to `run`:  K=16 scripts/launch_8gpu.sh --rounds 100
set -euo pipefail

MODEL=${MODEL:-llama-7b}
ALGO=${ALGO:-fedsgd}
K=${K:-auto}
NUM_GPUS=${NUM_GPUS:-8}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_gpu_bf16.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${MODEL}-${ALGO}-${NUM_GPUS}gpu}

exec deepspeed --num_gpus "$NUM_GPUS" --module --no_local_rank profit_ds run \
  --model "$MODEL" --algo "$ALGO" --dtype bf16 --ds-config "$DS_CONFIG" \
  --clients-in-parallel "$K" --output-dir "$OUTPUT_DIR" "$@"
