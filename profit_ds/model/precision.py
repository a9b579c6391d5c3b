"""What `--dtype auto` (a pretrained model's default) means on this process's device.

bf16 halves a backbone's memory, and where the hardware multiplies bf16 natively (CUDA GPUs
that support it; CPUs with AVX-512 BF16 or AMX) its matrix products run 2-4x faster than fp32.
Where it does not, PyTorch emulates them: on an AVX2-only AMD EPYC a bf16 GEMM of SmolLM2's
MLP shape ran 7x slower than fp32 (10 against 68 GFLOP/s, docs/BENCHMARKS.md), so
`auto` takes fp32 there. The choice is made once, when the config is built, and recorded in
config.json as the concrete dtype (a resumed run keeps it).
"""
from __future__ import annotations

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`dtype` itself, or for `auto` bf16 where it is native on `device` and fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "bf16" if native_bf16(device) else "fp32"
