# profit-ds on NVIDIA GPUs: CUDA PyTorch + DeepSpeed + profit-ds; the entrypoint is `profit-ds`.
#   docker build -t profit-ds .
#   docker run --rm --gpus all --ipc=host -v ~/.cache/huggingface:/root/.cache/huggingface \
#     -v "$PWD/data:/data" -v "$PWD/runs:/runs" profit-ds run --model llama-7b --dtype bf16 ...
# docs/GPU.md explains each choice; tests/test_ops.py checks the pins against pyproject.toml.

# torch 2.8.0 + CUDA 12.8 (Ampere, Hopper, Blackwell); devel: nvcc for DeepSpeed's op builds.
FROM pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# DeepSpeed, with the one CUDA op this workload can use precompiled: the quantizer behind
# ZeRO++ quantized weight all-gathers (zero_quantized_weights), worth it across nodes. Other ops
# (Adam kernels, inference kernels) are unused here; the CPU accelerator's shm/cpu ops are
# never taken on a GPU. There is no GPU during `docker build`, so DS_ACCELERATOR=cuda and the
# architecture list stand in for detection: A100 8.0, A10/3090 8.6, L4/L40/4090 8.9, H100 9.0.
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"
RUN pip install --no-cache-dir "setuptools==80.9.0" "wheel==0.45.1" "ninja==1.13.0" \
 && DS_ACCELERATOR=cuda DS_BUILD_OPS=0 DS_BUILD_QUANTIZER=1 \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" \
    pip install --no-cache-dir --no-build-isolation "deepspeed==0.19.8"

WORKDIR /opt/profit-ds
COPY pyproject.toml README.md ./
COPY profit_ds ./profit_ds
COPY ds_configs ./ds_configs
COPY scripts ./scripts

# Every dependency pinned to the versions profit-ds is tested with; torch stays the image's.
RUN pip install --no-cache-dir \
    "torch==2.8.0" \
    "deepspeed==0.19.8" \
    "transformers==5.24.0" \
    "peft==0.21.2" \
    "accelerate==1.15.0" \
    "datasets==5.2.0" \
    "rouge-score==0.1.2" \
    "typer==0.29.2" \
    "rich==15.0.0" \
    "safetensors==0.8.0" \
    "pyyaml==6.0.3" \
    "matplotlib==3.11.2" \
    "gguf==0.19.0" \
    .

WORKDIR /workspace
ENTRYPOINT ["profit-ds"]
CMD ["--help"]
