"""Where a larger batch stops paying on this machine: the throughput caps of profit_ds.memory
(TOKENS_PER_FORWARD_CAP, GENERATION_ROWS_CAP), measured on SmolLM2-135M-Instruct and the SNI
sample as a run prepares them.

Training: one local step of 8 clients x 8 rows (the run's forward chunking, bytes unbounded),
at several caps on a forward's padded tokens: text tokens per second, best of 2. Generation:
what personalization scores, 8 prompts over the global test set (8 x 39 rows), at several rows
per generate call: examples per second, one pass after a short warm-up (a pass takes minutes).
Each point runs in a fresh process (its peak RSS is its own).

    python scripts/bench_budgets.py [--dtype bf16] [--write-docs docs/BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

SECTION = "## Budgets: where a larger batch stops paying"
TOKENS = (1024, 2048, 4096, 8192)
ROWS = (16, 64, 128, 256)
# generate calls of 64 rows bounded by padded positions per call (None: rows alone)
CALL_TOKENS = (None, 32768, 16384, 8192, 4096)


def worker(kind: str, size: int, dtype: str, data: str, tokens: int | None = None) -> dict:
    import torch

    from profit_ds.config import build
    from profit_ds.data.for_run import load_tasks, run_partition
    from profit_ds.evaluation.generate import evaluate
    from profit_ds.fl.gradients import mean_loss_gradients
    from profit_ds.memory import GB, ForwardLimit
    from profit_ds.runner import set_up

    cfg = build(dict(model="smollm2-135m", data=data, dtype=dtype, max_per_client=24,
                     clients_per_round=4))
    s = set_up(cfg, run_partition(cfg, load_tasks(cfg)))
    bank = {"prompt": torch.randn(8, cfg.prompt_tokens, s.backbone.hidden_size) * 0.05}
    times = []
    if kind == "train":
        s.backbone.limit = ForwardLimit(s.budgets.forward.costs, 1000 * GB, size)
        rows = [(k, e) for k, c in enumerate(s.data.train_clients[:8]) for e in c.train[:8]]
        work = sum(len(e.source) + len(e.target) for _, e in rows)
        mean_loss_gradients(s.backbone, bank, rows[:8], 8)
        for _ in range(2):
            t = time.perf_counter()
            mean_loss_gradients(s.backbone, bank, rows, len(rows))
            times.append(time.perf_counter() - t)
    else:
        sets = [(k, s.data.global_test) for k in range(len(bank))]
        work = sum(len(x) for _, x in sets)
        evaluate(s.backbone, bank, [(0, s.data.test_clients[0].test)], s.new_tokens,
                 size, batch_tokens=tokens)
        for _ in range(1):
            t = time.perf_counter()
            evaluate(s.backbone, bank, sets, s.new_tokens, size, batch_tokens=tokens)
            times.append(time.perf_counter() - t)
    return {"rate": work / min(times), "peak_rss_mb":
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def measure(kind: str, size: int, dtype: str, data: str, tokens: int | None = None) -> dict:
    extra = ["--call-tokens", str(tokens)] if tokens else []
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(size), "--dtype", dtype,
                          "--data", data, *extra], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{kind} {size} {tokens or ''}: {result}", file=sys.stderr, flush=True)
    return result


def _table(header: str, points: list[tuple[str, dict]], digits: int) -> list[str]:
    """Rate and peak RSS per point, with each rate's share of the best."""
    best = max(r["rate"] for _, r in points)
    return ["", f"| {header} | peak RSS MiB |", "|---:|---:|---:|"] + [
        f"| {x} | {r['rate']:.{digits}f} ({r['rate'] / best:.0%}) | {r['peak_rss_mb']:.0f} |"
        for x, r in points]


def tables(dtype: str, data: str, parts: set[str]) -> str:
    lines = [SECTION, "",
             f"SmolLM2-135M-Instruct ({dtype}), SNI sample as a run prepares it (chat template, "
             "1024/128 token limits, P = 20). Training: one local step of 8 clients x 8 rows, "
             "text tokens/s at each cap on a forward's padded row tokens, best of 2. "
             "Generation: 8 prompts over the global test set (312 rows, greedy, the run's "
             "max_new_tokens), examples/s at each number of rows per generate call, and at "
             "64 rows with each bound on a call's padded positions (prompt, source and new "
             "tokens), one pass. Each point in a fresh process; share of the best rate in "
             "parentheses."]
    if "train" in parts:
        lines += _table("tokens per forward | train tokens/s",
                        [(str(t), measure("train", t, dtype, data)) for t in TOKENS], 0)
    if "rows" in parts:
        lines += _table("rows per generate | examples/s",
                        [(str(n), measure("generate", n, dtype, data)) for n in ROWS], 2)
    if "tokens" in parts:
        lines += _table("padded positions per generate call (64 rows) | examples/s",
                        [(f"{t:,}" if t else "rows alone",
                          measure("generate", 64, dtype, data, t)) for t in CALL_TOKENS], 2)
    lines += ["", f"Machine: {platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
              f"CPUs, {time.strftime('%Y-%m-%d')}. Reproduce: `python scripts/bench_budgets.py "
              f"--dtype {dtype} --write-docs docs/BENCHMARKS.md`.", ""]
    return "\n".join(lines)


def write_docs(path: Path, text: str) -> None:
    doc = path.read_text(encoding="utf-8")
    if SECTION in doc:
        start = doc.index(SECTION)
        end = doc.find("\n## ", start + len(SECTION))
        doc = doc[:start] + text + (doc[end + 1:] if end != -1 else "")
    else:
        doc = doc.rstrip() + "\n\n" + text
    path.write_text(doc, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "SIZE"))
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    parser.add_argument("--data", default="../shared/sni-sample/tasks")
    parser.add_argument("--call-tokens", type=int)
    parser.add_argument("--parts", default="train,rows,tokens",
                        help="which tables: train, rows, tokens (comma-separated)")
    parser.add_argument("--write-docs", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.dtype, args.data,
                                args.call_tokens)))
        return
    text = tables(args.dtype, args.data, set(args.parts.split(",")))
    print(text)
    if args.write_docs:
        write_docs(args.write_docs, text)


if __name__ == "__main__":
    main()
