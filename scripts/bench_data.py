"""Benchmark: time and peak memory to load and partition a full-size synthetic SNI corpus.

Generates TASKS x INSTANCES task files in SNI's JSON shape (default 1,600 x 1,000, the size of
the real corpus), then loads and partitions them twice in fresh processes: cold (empty Arrow
cache: every file parsed) and cached (the Arrow cache memory-mapped). Each phase runs in its own
process so its peak RSS is its own. Prints a table and, with --write-docs, rewrites the
"Data loading" section of docs/BENCHMARKS.md.

    python scripts/bench_data.py --write-docs docs/BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the a of to and in is was for on with as by at from that this it be are have not "
         "question answer sentence review movie food story city team player price market "
         "science energy planet river good bad happy late early small large first last").split()
SECTION = "## Data loading"


def _sentences(rng: random.Random, n: int, words: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=words)) for _ in range(n)]


def generate(root: Path, tasks: int, instances: int, categories: int, seed: int = 0) -> int:
    """Write the corpus; return its size in bytes. Inputs reuse a sentence bank (fast to make,
    same bytes to parse as unique text) with a unique suffix per instance."""
    rng = random.Random(seed)
    bank = _sentences(rng, 4096, 45)
    root.mkdir(parents=True, exist_ok=True)
    size = 0
    for t in range(tasks):
        name = f"task{t:04d}_synthetic"
        record = {
            "Categories": [f"Category {t % categories:02d}"],
            "Definition": [f"Definition of task {t}: " + bank[t % len(bank)]],
            "Input_language": ["English"], "Output_language": ["English"],
            "Instruction_language": ["English"],
            "Positive Examples": [{"input": bank[(t + i) % len(bank)], "output": "yes",
                                   "explanation": "because"} for i in range(2)],
            "Instances": [{"id": f"{name}-{i}", "input": f"{bank[(t * 7 + i) % len(bank)]} #{i}",
                           "output": [bank[i % len(bank)][:30]] * (1 + i % 2)}
                          for i in range(instances)],
        }
        path = root / f"{name}.json"
        path.write_text(json.dumps(record))
        size += path.stat().st_size
    return size


def _anon_rss_mb() -> float:
    """Private (anonymous) resident memory now. Peak RSS also counts the memory-mapped cache's
    file pages that were read: shared page cache the kernel can drop, not memory we hold."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phase(corpus: Path, cache: Path, heterogeneity: str, num_clients: int) -> dict:
    """Load + partition in this process; report seconds and peak RSS."""
    start = time.perf_counter()
    from profit_ds.data.loading import load_tasks
    from profit_ds.data.partition import PartitionSpec, build_partition
    import datasets  # noqa: F401  (imported lazily by the loader; timed apart from loading)
    imported = time.perf_counter()
    tasks = load_tasks(str(corpus), cache_dir=cache)
    loaded = time.perf_counter()
    part = build_partition(tasks, PartitionSpec(heterogeneity=heterogeneity,
                                                num_clients=num_clients))
    done = time.perf_counter()
    examples = sum(len(c.train) + len(c.test) for c in
                   part.train_clients + part.validation_clients + part.test_clients)
    return {"import_s": imported - start, "load_s": loaded - imported,
            "partition_s": done - loaded, "tasks": len(tasks),
            "instances": sum(len(t.instances) for t in tasks), "examples": examples,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "anon_rss_mb": _anon_rss_mb()}


def baseline_rss() -> dict:
    """Peak RSS of a process that only imports the loader: the floor under every phase."""
    import profit_ds.data.loading  # noqa: F401
    import profit_ds.data.partition  # noqa: F401
    import datasets  # noqa: F401
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "anon_rss_mb": _anon_rss_mb()}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def table(args: argparse.Namespace, corpus_mb: float, cache_mb: float, gen_s: float,
          base: dict, cold: dict, cached: dict) -> str:
    """The Markdown section for docs/BENCHMARKS.md."""
    lines = [
        SECTION, "",
        f"Synthetic corpus: {args.tasks:,} tasks x {args.instances:,} instances "
        f"({cold['instances']:,} instances, {min(args.categories, args.tasks)} categories, "
        f"{corpus_mb:,.0f} MB of JSON, generated in {gen_s:.0f} s; Arrow cache "
        f"{cache_mb:,.0f} MB). Partition: "
        f"`--heterogeneity {args.heterogeneity} --num-clients {args.num_clients}` "
        f"({cold['examples']:,} examples; the cap is 10,000). Each phase is a fresh process; "
        f"RSS includes the interpreter and imports ({base['peak_rss_mb']:.0f} MB peak, "
        f"{base['anon_rss_mb']:.0f} MB private, alone). Peak RSS also counts pages of the "
        "memory-mapped cache that were read (shared page cache the kernel can drop); private "
        "RSS is the memory the process itself holds at the end.",
        "",
        "| phase | imports (s) | load (s) | partition (s) | peak RSS (MB) "
        "| private RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in (("cold (parse JSON, write Arrow cache)", cold),
                      ("cached (memory-mapped Arrow)", cached)):
        lines.append(f"| {name} | {row['import_s']:.2f} | {row['load_s']:.2f} | "
                     f"{row['partition_s']:.2f} | {row['peak_rss_mb']:.0f} | "
                     f"{row['anon_rss_mb']:.0f} |")
    lines += ["", f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared), Python "
              f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}.", "",
              "Reproduce: `python scripts/bench_data.py --write-docs docs/BENCHMARKS.md`", ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace only this benchmark's section; other sections belong to other benchmarks."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1600)
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--categories", type=int, default=76)
    parser.add_argument("--heterogeneity", default="dirichlet:1")
    parser.add_argument("--num-clients", type=int, default=100)
    parser.add_argument("--write-docs", type=Path)
    parser.add_argument("--phase", choices=["load", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "load":
        print(json.dumps(phase(args.corpus, args.cache, args.heterogeneity, args.num_clients)))
        return
    if args.phase == "baseline":
        print(json.dumps(baseline_rss()))
        return

    work = Path(tempfile.mkdtemp(prefix="profit-ds-bench-"))
    try:
        corpus, cache = work / "tasks", work / "cache"
        start = time.perf_counter()
        corpus_mb = generate(corpus, args.tasks, args.instances, args.categories) / 2**20
        gen_s = time.perf_counter() - start
        common = ["--corpus", str(corpus), "--cache", str(cache), "--heterogeneity",
                  args.heterogeneity, "--num-clients", str(args.num_clients)]
        base = _child("--phase", "baseline")
        cold = _child("--phase", "load", *common)
        cached = _child("--phase", "load", *common)
        section = table(args, corpus_mb, _dir_mb(cache), gen_s, base, cold, cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(section)
    if args.write_docs:
        write_section(args.write_docs, section)


if __name__ == "__main__":
    main()
