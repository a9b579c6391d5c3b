"""bf16 vs fp32 on this machine: what `--dtype auto` (profit_ds.model.precision) decides from.

bf16 pays only where the hardware multiplies it natively (AVX-512 BF16 or AMX on a CPU, a GPU
that supports it); elsewhere PyTorch emulates it. On one machine, in one run, alternating the
dtypes: the GEMM peak (scripts/bench.py's samples, best of 3), SmolLM2-135M-Instruct's forward
and backward of a batch to the input embeddings (what a prompt's training step costs the
backbone) and its greedy decoding (HF `generate`, KV cache), best of 2 each.

    python scripts/bench_dtype.py [--write-docs docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench import gemm_peak, write_section

SECTION = "## bf16 without native support"
END = "<!-- end of the figures scripts/bench_dtype.py writes; notes below are kept -->"
ROWS, TOKENS, NEW = 4, 256, 32


def best_of(n: int, step) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times)


def model_times(dtype: str) -> tuple[float, float]:
    """Seconds of one training forward+backward and of one greedy generation."""
    from profit_ds.model.backbone import load_backbone

    model = load_backbone("smollm2-135m", dtype).model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (ROWS, TOKENS), generator=gen)

    def train() -> None:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=embeds, use_cache=False).logits.float().mean().backward()

    def generate() -> None:
        with torch.no_grad():
            model.generate(ids[:, :64], max_new_tokens=NEW, min_new_tokens=NEW,
                           do_sample=False, pad_token_id=0)

    train()  # warm-up: first-call allocations and kernel choices
    return best_of(2, train), best_of(2, generate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--write-docs", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    peaks = {"fp32": 0.0, "bf16": 0.0}
    for _ in range(3):
        for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            peaks[name] = max(peaks[name], gemm_peak(dt))
    times = {name: model_times(name) for name in ("fp32", "bf16")}
    cpu = torch.cpu
    native = {probe: getattr(cpu, f"_is_{probe}_supported", lambda: False)()
              for probe in ("avx512_bf16", "amx_tile")}
    rows = [("GEMM peak (GFLOP/s)", peaks["fp32"] / 1e9, peaks["bf16"] / 1e9),
            (f"SmolLM2 forward+backward, {ROWS} x {TOKENS} tokens (s)", *(t[0] for t in times.values())),
            (f"SmolLM2 greedy generate, {ROWS} rows, {NEW} new tokens (s)",
             *(t[1] for t in times.values()))]
    lines = [SECTION, "",
             f"`python scripts/bench_dtype.py --write-docs docs/BENCHMARKS.md`; CPU capability "
             f"{torch.backends.cpu.get_cpu_capability()}, avx512_bf16 {native['avx512_bf16']}, "
             f"amx {native['amx_tile']}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}. `--dtype auto` here: "
             f"{'bf16' if any(native.values()) else 'fp32'}.", "",
             "| measure | fp32 | bf16 | bf16 / fp32 |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |" for name, a, b in rows]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        write_section(args.write_docs, text, SECTION, END)


if __name__ == "__main__":
    main()
