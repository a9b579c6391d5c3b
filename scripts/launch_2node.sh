#!/usr/bin/env bash
# Two nodes x 8 GPUs: llama-7b, FedSGD, bf16 ZeRO-3 sharded 16 ways, NCCL across nodes.
# Run on the first host of the hostfile. DeepSpeed's launcher reaches the others over
# passwordless ssh (pdsh); each node needs the same checkout/image, model cache and data path.
# Variables to forward to every rank (NCCL_*, HF_HOME, ...) go in ./.deepspeed_env as NAME=value.
# Check the memory first:  profit-ds plan --model llama-7b --gpus 8 --nodes 2
#   HOSTFILE=my_hosts MASTER_ADDR=node1 scripts/launch_2node.sh --rounds 100
set -euo pipefail

MODEL=${MODEL:-llama-7b}
ALGO=${ALGO:-fedsgd}
K=${K:-auto}
HOSTFILE=${HOSTFILE:-scripts/hostfile.example}
MASTER_ADDR=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_gpu_bf16.json}
OUTPUT_DIR=${OUTPUT_DIR:-runs/${MODEL}-${ALGO}-2node}

exec deepspeed --hostfile "$HOSTFILE" --num_nodes 2 --num_gpus 8 \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --module --no_local_rank \
  profit_ds run \
  --model "$MODEL" --algo "$ALGO" --dtype bf16 --ds-config "$DS_CONFIG" \
  --clients-in-parallel "$K" --output-dir "$OUTPUT_DIR" "$@"
