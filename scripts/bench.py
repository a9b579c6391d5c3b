"""Benchmark: federated prompt tuning throughput and memory, profit-ds against a plain PEFT loop.

One run measures every variant side by side on the same workload: the same random-init 4-layer,
512-wide Llama (built-in tokenizer), the built-in suite's train clients, the same initial prompt,
the same FedAvg rounds (Adam clients, example-weighted averaging), the same local batches:

- `peft`: what OpenFedLLM does: `get_peft_model` with PromptTuningConfig, and for each client
  load the global prompt, make a fresh torch optimizer, train, read the prompt back;
  sequentially, in plain PyTorch, with transformers' default attention (SDPA). With N ranks it
  is data parallel: each rank holds a whole copy of the model and takes its share of every
  batch, as DDP would.
- `peft-eager`: the same loop with the attention kernel profit-ds picks, where that differs
  (eager in bf16 on a CPU): the comparison of designs with the kernels held equal.
- `K=1`, `K=auto`: profit-ds (`federated_round`) on a ZeRO-3 backbone sharded over N ranks (the
  whole model at 1 rank, as `profit-ds run` does), one client per batched step, or as many as
  `--clients-in-parallel auto` picks.

Each (variant, ranks) pair runs in fresh processes (peak RSS is per variant); N ranks are N
processes with RANK/WORLD_SIZE set, as a launcher would. The GEMM peak is measured first, in
this process, in the benchmark's dtype, on all CPU cores (on a GPU machine: on one GPU, counted
N times for N ranks): MFU = the FLOPs a variant needs / s / that peak.

    python scripts/bench.py --write-docs docs/BENCHMARKS.md     (or: profit-ds bench ...)
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import mean
from typing import Callable, Sequence

import torch

SECTION = "## Training and generation"
END_OF_FIGURES = "<!-- end of the figures scripts/bench.py writes; notes below are kept -->"
VARIANTS = ("K=1", "K=auto", "peft", "peft-eager")


@dataclass(frozen=True)
class Workload:
    """Everything that defines the work of a round: identical for every variant."""

    model_dir: str
    dtype: str = "fp32"
    instances_per_task: int = 40
    clients_per_round: int = 12
    batch_size: int = 8
    local_epochs: int = 1
    client_lr: float = 0.03
    prompt_tokens: int = 20
    rounds: int = 3          # timed rounds, after one warm-up round
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.dtype]


# ---------------------------------------------------------------- workload and its arithmetic

def build_model(out: Path) -> None:
    """The benchmark backbone: random init (its quality is irrelevant to speed), 4 layers,
    512 wide, the built-in tokenizer's ~1k vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from profit_ds.model.builtin import BUILTIN_DIR

    tok = AutoTokenizer.from_pretrained(BUILTIN_DIR)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1376,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)


def initial_prompt(model_dir: str, num_tokens: int, seed: int) -> torch.Tensor:
    """One fp32 prompt every variant starts from (Gaussian at the embeddings' scale)."""
    from safetensors import safe_open

    with safe_open(Path(model_dir) / "model.safetensors", "pt") as f:
        table = f.get_tensor("model.embed_tokens.weight").float()
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, table.shape[1], generator=gen) * table.std()


def load_data(tokenizer, w: Workload):
    """The built-in suite, one client per task, tokenized as `profit-ds run` does."""
    from profit_ds.data.builtin import builtin_tasks
    from profit_ds.data.format import FormatSpec
    from profit_ds.data.partition import PartitionSpec, build_partition
    from profit_ds.fl.clients import encode_partition

    partition = build_partition(builtin_tasks(instances_per_task=w.instances_per_task),
                                PartitionSpec(heterogeneity="task", seed=w.seed), FormatSpec())
    return encode_partition(tokenizer, partition, 256, 64)


def round_clients(data, w: Workload, round_idx: int) -> list:
    from profit_ds.fl.rounds import sample_clients

    picked = sample_clients(len(data.train_clients), w.clients_per_round, w.seed, round_idx)
    return [data.train_clients[i] for i in picked]


def attention_flops(config, queries: int, keys: int) -> float:
    """Scores and weighted values, forward (4*q*k*D per layer) and backward (twice that)."""
    return 12 * config.num_hidden_layers * queries * keys * config.hidden_size


def linear_flops(config, tokens: int) -> float:
    """Every weight matrix, forward (2 per weight per token) and backward to the inputs only
    (2 more: the backbone is frozen, so no weight gradients)."""
    d = config.hidden_size
    kv = d * config.num_key_value_heads // config.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size
    return 4 * tokens * config.num_hidden_layers * per_layer


def row_flops(config, prompt_tokens: int, e) -> float:
    """FLOPs of one training row run as `[prompt ; source ; target]` (what the PEFT loop does):
    the weights and attention over the whole sequence, and the LM head at label positions only
    (4 per vocabulary entry per label). Padding and LM-head work at other positions are waste,
    not counted."""
    t = prompt_tokens + len(e.source) + len(e.target)
    return (linear_flops(config, t) + attention_flops(config, t, t)
            + 4 * len(e.target) * config.hidden_size * config.vocab_size)


def shared_row_flops(config, prompt_tokens: int, e) -> float:
    """FLOPs of one row in profit-ds, whose rows attend to their client's cached prompt: the
    weights and the LM head at the row's own tokens, attention over prompt and tokens."""
    t = len(e.source) + len(e.target)
    return (linear_flops(config, t) + attention_flops(config, t, prompt_tokens + t)
            + 4 * len(e.target) * config.hidden_size * config.vocab_size)


def prefill_flops(config, prompt_tokens: int, examples) -> float:
    """A lower bound on the FLOPs of generating for `examples`: each row's weights forward over
    its prompt and source (2 per weight per token) and the LM head at its last position;
    attention and the decoding steps are left out. Time at the GEMM peak for these FLOPs is
    less than any implementation needs, which makes a ratio of it a true ceiling."""
    return sum(linear_flops(config, prompt_tokens + len(e.source)) / 2
               + 2 * config.hidden_size * config.vocab_size for e in examples)


def round_work(data, w: Workload, round_idx: int, config) -> tuple[int, dict[str, float]]:
    """Text tokens (source + target, every epoch) and FLOPs of one round as each variant runs
    it: the PEFT loop runs every row with its prompt; profit-ds runs a client's prompt once per
    local step (at least: a step whose rows span two forwards runs it twice, so its MFU is, if
    anything, under-counted) and its rows against that prompt's keys and values."""
    clients = round_clients(data, w, round_idx)
    rows = [e for c in clients for e in c.train] * w.local_epochs
    steps = sum(-(-len(c.train) // w.batch_size) for c in clients) * w.local_epochs
    prompt_pass = (linear_flops(config, w.prompt_tokens)
                   + attention_flops(config, w.prompt_tokens, w.prompt_tokens))
    concatenated = sum(row_flops(config, w.prompt_tokens, e) for e in rows)
    shared = steps * prompt_pass + sum(shared_row_flops(config, w.prompt_tokens, e) for e in rows)
    return (sum(len(e.source) + len(e.target) for e in rows),
            {"peft": concatenated, "peft-eager": concatenated, "K=1": shared, "K=auto": shared})


def on_gpu() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    """Wait for queued GPU work, so that a clock read after it counts it."""
    if on_gpu():
        torch.cuda.synchronize()


def gemm_peak(dtype: torch.dtype, reps: int = 4) -> float:
    """Best FLOP/s of square matmuls in `dtype` on all CPU cores, or on one GPU: one sample of
    the MFU denominator (the run keeps the best of several, taken between variants, since other
    jobs on a shared machine can take a core away during any one of them)."""
    device = "cuda" if on_gpu() else "cpu"
    best = 0.0
    for n in (4096, 8192) if on_gpu() else (1024, 2048):
        a, b = (torch.randn(n, n, dtype=dtype, device=device) for _ in range(2))
        a @ b
        for _ in range(reps):
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
    return best


def machine_peak(peak: float, ranks: int) -> float:
    """The peak available to `ranks` ranks: the CPU's all cores are shared by every rank; each
    rank has a GPU of its own."""
    return peak * ranks if on_gpu() else peak


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------- the variants (one per process)

def timed_rounds(w: Workload, run_round: Callable[[int, torch.Tensor], torch.Tensor],
                 prompt: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """One warm-up round, then `w.rounds` timed ones; every rank calls it in step. Returns
    wall seconds and this process's CPU seconds per timed round (CPU time is what other jobs
    on the machine disturb least)."""
    from profit_ds import distributed

    wall, cpu = [], []
    for r in range(1, w.rounds + 2):
        sync()
        distributed.barrier()
        t, c = time.perf_counter(), time.process_time()
        prompt = run_round(r, prompt)
        sync()
        distributed.barrier()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"seconds": wall[1:], "cpu_seconds": cpu[1:]}, prompt


def profit_ds_worker(w: Workload, k: str, prompt: torch.Tensor) -> dict:
    """profit-ds's own round on a ZeRO-3 backbone, then batched vs client-by-client generation."""
    from profit_ds.config import RunConfig
    from profit_ds.fl.optim import ClientOptimizer
    from profit_ds.fl.rounds import RoundSpec, federated_round
    from profit_ds.fl.server import ServerOptimizer, ServerState
    from profit_ds.model.backbone import load_backbone
    from profit_ds.runner import clients_in_parallel

    backbone = load_backbone(w.model_dir, w.dtype)
    data = load_data(backbone.tokenizer, w)
    cfg = RunConfig(clients_in_parallel=k, batch_size=w.batch_size)
    k_parallel = clients_in_parallel(cfg, data, w.prompt_tokens)
    spec = RoundSpec("fedavg", ClientOptimizer("adam"), w.client_lr, w.local_epochs,
                     w.batch_size, ServerOptimizer("sgd", 1.0), w.clients_per_round, w.seed)
    state = ServerState()
    times, prompt = timed_rounds(w, lambda r, p: federated_round(
        backbone, p, state, data.train_clients, spec, r, k_parallel)[0], prompt)
    result = {"k": min(k_parallel, w.clients_per_round), **times, "prompt": prompt.tolist(),
              "peak_rss": peak_rss_bytes(),
              "resident_bytes": backbone.resident_parameter_bytes(),
              "total_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size()
                                 for p in backbone.model.parameters())}
    if k == "auto":
        result["generation"] = generation_rates(backbone, data, prompt)
    return result


def generation_rates(backbone, data, prompt: torch.Tensor) -> dict:
    """Examples/s scoring every test client's own prompt on its test set: all clients in
    shared batches (profit-ds) vs one `generate` per client (a per-client loop)."""
    from profit_ds import distributed
    from profit_ds.config import RunConfig
    from profit_ds.evaluation.generate import evaluate
    from profit_ds.runner import max_new_tokens

    clients = data.test_clients
    gen = torch.Generator().manual_seed(1)
    bank = prompt + 0.01 * torch.randn(len(clients), *prompt.shape, generator=gen)
    new_tokens = max_new_tokens(RunConfig(), data, backbone.tokenizer)
    rows = RunConfig().eval_batch_size
    examples = sum(len(c.test) for c in clients)

    def rate(work: Callable[[], None]) -> float:
        """Examples/s of the best of two passes (the machine is shared)."""
        seconds = []
        for _ in range(2):
            sync()
            distributed.barrier()
            t = time.perf_counter()
            work()
            seconds.append(time.perf_counter() - t)
        return examples / min(seconds)

    evaluate(backbone, bank, [(0, clients[0].test)], new_tokens, rows)  # warm-up
    batched = rate(lambda: evaluate(backbone, bank, [(k, c.test) for k, c in enumerate(clients)],
                                    new_tokens, rows))
    one_by_one = rate(lambda: [evaluate(backbone, bank[k: k + 1], [(0, c.test)], new_tokens, rows)
                               for k, c in enumerate(clients)])
    return {"batched": batched, "per_client": one_by_one, "examples": examples,
            "max_new_tokens": new_tokens,
            "prefill_flops": prefill_flops(backbone.model.config, prompt.shape[0],
                                           [e for c in clients for e in c.test.encoded])}


def peft_worker(w: Workload, prompt: torch.Tensor, attention: str | None = None) -> dict:
    """The straightforward loop, plain PyTorch: per client, load the global prompt into the PEFT
    model, fresh Adam, train its local steps, read the prompt back; average. At N ranks it is
    data parallel as DDP would run it: each rank holds the whole model, takes its share of
    every batch, and the prompt gradient is summed over ranks before each step. `attention`:
    transformers' attention implementation (None: its default)."""
    import torch.distributed as dist
    from peft import (PromptTuningConfig, get_peft_model, get_peft_model_state_dict,
                      set_peft_model_state_dict)
    from transformers import AutoTokenizer, LlamaForCausalLM

    from profit_ds import distributed
    from profit_ds.fl.clients import local_batches
    from profit_ds.model.prompted import collate

    distributed.share_cpu_threads()
    if on_gpu():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if on_gpu() else "gloo")
    device = distributed.device()
    tokenizer = AutoTokenizer.from_pretrained(w.model_dir)
    base = LlamaForCausalLM.from_pretrained(w.model_dir, dtype=w.torch_dtype,
                                            attn_implementation=attention).to(device).eval()
    base.requires_grad_(False)
    model = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM",
                                                    num_virtual_tokens=w.prompt_tokens))
    data = load_data(tokenizer, w)

    def backward(examples: list) -> None:
        """This rank's share of the batch, its loss scaled to the whole batch's mean."""
        mine = examples[distributed.my_slice(len(examples))]
        if not mine:  # fewer rows than ranks: a zero gradient, still summed with the others
            (sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0).backward()
            return
        batch = collate(mine, [0] * len(mine), tokenizer.pad_token_id).to(device)
        share = sum(len(e.target) for e in mine) / sum(len(e.target) for e in examples)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     labels=batch.labels).loss
        (loss * share).backward()

    def train_client(client, global_prompt: torch.Tensor, round_idx: int) -> torch.Tensor:
        set_peft_model_state_dict(model, {"prompt_embeddings": global_prompt})
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=w.client_lr)
        for idx in local_batches(client.num_examples, w.local_epochs, w.batch_size,
                                 f"{w.seed}/round{round_idx}/{client.name}"):
            backward([client.train[i] for i in idx])
            distributed.all_reduce_sum(*(p.grad for p in params))
            opt.step()
            opt.zero_grad()
        return get_peft_model_state_dict(model)["prompt_embeddings"].float().cpu()

    def run_round(round_idx: int, global_prompt: torch.Tensor) -> torch.Tensor:
        clients = round_clients(data, w, round_idx)
        total = sum(c.num_examples * train_client(c, global_prompt, round_idx).double()
                    for c in clients)
        return (total / sum(c.num_examples for c in clients)).float()

    times, prompt = timed_rounds(w, run_round, prompt)
    full = sum(p.numel() * p.element_size() for p in base.parameters())
    return {"k": 1, **times, "prompt": prompt.tolist(), "peak_rss": peak_rss_bytes(),
            "resident_bytes": full, "total_bytes": full}


def worker_main(args: argparse.Namespace) -> None:
    """One rank of one variant: run it, write this rank's figures as JSON."""
    w = Workload(**json.loads(args.workload))
    prompt = initial_prompt(w.model_dir, w.prompt_tokens, w.seed)
    if args.worker == "peft":
        result = peft_worker(w, prompt)
    elif args.worker == "peft-eager":  # measure() runs it only where this is "eager"
        from profit_ds.model.backbone import attention_implementation
        result = peft_worker(w, prompt, attention_implementation(w.dtype))
    else:
        result = profit_ds_worker(w, args.worker.split("=")[1], prompt)
    rank = os.environ.get("RANK", "0")
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the driver

def spawn(variant: str, ranks: int, w: Workload, scratch: Path) -> list[dict]:
    """Run `variant` as `ranks` fresh processes; return each rank's figures."""
    from profit_ds.distributed import _free_port

    out = Path(tempfile.mkdtemp(dir=scratch, prefix=f"{variant.replace('=', '')}-{ranks}-"))
    port = str(_free_port())
    cmd = [sys.executable, __file__, "--worker", variant, "--workload", json.dumps(asdict(w)),
           "--result-dir", str(out)]
    procs = []
    for r in range(ranks):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errors = [p.communicate()[1] for p in procs]
    for p, err in zip(procs, errors):
        if p.returncode:
            raise SystemExit(f"{variant} at {ranks} ranks failed:\n{err[-3000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


@dataclass
class Measured:
    """One (variant, ranks) row of a training table."""

    variant: str
    ranks: int
    k: int
    seconds: float
    cpu_seconds: float       # CPU seconds of the best round, summed over ranks
    tokens_per_s: float
    mfu: float
    peak_rss: int
    resident_bytes: int
    total_bytes: int
    prompt_diff: float       # relative difference of the final prompt from the first row's
    generation: dict | None


@dataclass
class DtypeResult:
    dtype: str
    gemm_peak: float
    rows: list[Measured]


def summarize(variant: str, ranks: int, per_rank: list[dict], tokens: float, flops: float,
              peak: float, reference: torch.Tensor) -> Measured:
    r0 = per_rank[0]
    seconds = min(r0["seconds"])
    diff = float((torch.tensor(r0["prompt"]) - reference).norm() / reference.norm())
    best = r0["seconds"].index(seconds)
    cpu = sum(r["cpu_seconds"][best] for r in per_rank)
    return Measured(variant, ranks, r0["k"], seconds, cpu, tokens / seconds, flops / seconds / peak,
                    max(r["peak_rss"] for r in per_rank),
                    max(r["resident_bytes"] for r in per_rank), r0["total_bytes"], diff,
                    r0.get("generation"))


def measure(w: Workload, rank_counts: Sequence[int], variants: Sequence[str], repeats: int,
            scratch: Path, log: Callable[[str], None]) -> DtypeResult:
    """Every variant at every rank count, in `w.dtype`, `repeats` times in rotation (each
    variant keeps its fastest run: a burst of other jobs then spoils one run, not the
    comparison), with GEMM peak samples in between."""
    from transformers import AutoConfig, AutoTokenizer

    from profit_ds.model.backbone import attention_implementation

    if attention_implementation(w.dtype) != "eager":  # then `peft` already runs our kernel
        variants = [v for v in variants if v != "peft-eager"]
    config = AutoConfig.from_pretrained(w.model_dir)
    data = load_data(AutoTokenizer.from_pretrained(w.model_dir), w)
    work = [round_work(data, w, r, config) for r in range(2, w.rounds + 2)]
    tokens = mean(t for t, _ in work)
    flops = {v: mean(f[v] for _, f in work) for v in VARIANTS}
    best: dict[tuple[str, int], list[dict]] = {}
    peaks = []
    for _ in range(repeats):
        for ranks in rank_counts:
            for variant in variants:
                peaks.append(gemm_peak(w.torch_dtype))
                log(f"{w.dtype}: {variant} at {ranks} rank(s) (GEMM sample "
                    f"{peaks[-1] / 1e9:.0f} GFLOP/s)")
                per_rank = spawn(variant, ranks, w, scratch)
                log(f"  best round {min(per_rank[0]['seconds']):.2f} s, K={per_rank[0]['k']}")
                kept = best.get((variant, ranks))
                if kept is None or min(per_rank[0]["seconds"]) < min(kept[0]["seconds"]):
                    best[(variant, ranks)] = per_rank
    peaks.append(gemm_peak(w.torch_dtype))
    reference = torch.tensor(best[(variants[0], rank_counts[0])][0]["prompt"])
    rows = [summarize(v, n, per_rank, tokens, flops[v], machine_peak(max(peaks), n), reference)
            for (v, n), per_rank in best.items()]
    return DtypeResult(w.dtype, max(peaks), rows)


# ---------------------------------------------------------------- report

def find(rows: Sequence[Measured], variant: str, ranks: int) -> Measured | None:
    return next((r for r in rows if r.variant == variant and r.ranks == ranks), None)


def targets(result: DtypeResult) -> list[tuple[str, str, float, float | None, bool]]:
    """(target, ratio measured, value, ceiling, met) for each target of issue 4 this run
    measured. The ceiling of a speed ratio is its value had the faster side run at the GEMM
    peak (its FLOPs / peak seconds) and the slower side as measured: no implementation on
    this machine can exceed it, so a target above its ceiling is out of reach here."""
    out: list[tuple[str, str, float, float | None, bool]] = []
    peak = result.gemm_peak

    def add(name: str, how: str, value: float, bound: float, at_least: bool = True,
            ceiling: float | None = None) -> None:
        out.append((f"{result.dtype}, {name}", how, value, ceiling,
                    value >= bound if at_least else value <= bound))

    def at_peak(row: Measured) -> float:
        """Seconds `row`'s round would take at the GEMM peak."""
        return row.mfu * row.seconds

    for ranks in sorted({r.ranks for r in result.rows}):
        k1, auto, peft, peft_eager = (find(result.rows, v, ranks) for v in VARIANTS)
        if not (k1 and auto and peft):
            continue
        where = "1 rank" if ranks == 1 else f"{ranks} ranks"
        if ranks == 1:
            add(f"{where}: K=auto at most 5% slower than K=1", "K=auto s / K=1 s",
                auto.seconds / k1.seconds, 1.05, at_least=False)
        else:
            add(f"{where}: K=auto >= 2.5x faster per round than K=1",
                "K=1 s / K=auto s", k1.seconds / auto.seconds, 2.5,
                ceiling=k1.seconds / at_peak(auto))
            gen = auto.generation
            add(f"{where}: batched evaluation >= 3x client by client",
                "batched / client-by-client ex/s", gen["batched"] / gen["per_client"], 3.0,
                ceiling=generation_ceiling(gen, machine_peak(peak, ranks)))
            add(f"{where}: backbone bytes per rank within 5% of total/N",
                "resident / (total/N)", auto.resident_bytes / (auto.total_bytes / ranks), 1.05,
                at_least=False)
        add(f"{where}: K=auto >= 1.5x faster than PEFT", "PEFT s / K=auto s",
            peft.seconds / auto.seconds, 1.5, ceiling=peft.seconds / at_peak(auto))
        if peft_eager:
            add(f"{where}: K=auto >= 1.5x faster than PEFT, both with eager attention",
                "PEFT-eager s / K=auto s", peft_eager.seconds / auto.seconds, 1.5,
                ceiling=peft_eager.seconds / at_peak(auto))
    ours = [r for r in result.rows if r.variant == "K=auto"]
    if ours:
        best = max(ours, key=lambda r: r.mfu)
        add("training MFU (K=auto) >= 50% of the GEMM peak",
            f"MFU at {best.ranks} rank(s)", best.mfu, 0.5)
    return out


def generation_ceiling(gen: dict, peak: float) -> float:
    """Batched over client-by-client generation, had the batched pass run its prefill FLOPs
    (a lower bound on its work) at the GEMM peak."""
    return (gen["examples"] / gen["per_client"]) / (gen["prefill_flops"] / peak)


Table = tuple[str, list[str], list[list[str]]]


def tables(w: Workload, results: Sequence[DtypeResult]) -> list[Table]:
    """(title, header, rows) of each table: printed with Rich and written as Markdown."""
    mb = 2 ** 20
    out: list[Table] = []
    for res in results:
        train = [[str(r.ranks), r.variant, str(r.k), f"{r.seconds:.2f}", f"{r.cpu_seconds:.1f}",
                  f"{r.tokens_per_s:,.0f}",
                  f"{r.mfu:.0%}", f"{r.peak_rss / mb:,.0f}", f"{r.resident_bytes / mb:.1f}",
                  f"{r.total_bytes / r.ranks / mb:.1f}", f"{r.prompt_diff:.1e}"]
                 for r in res.rows]
        out.append((f"Training, {res.dtype}: FedAvg, {w.clients_per_round} clients per round; "
                    f"GEMM peak {res.gemm_peak / 1e9:.0f} GFLOP/s"
                    f"{' per GPU' if on_gpu() else ''}",
                    ["ranks", "variant", "K", "s/round", "CPU s/round", "tokens/s", "MFU",
                     "peak RSS/rank MiB",
                     "backbone MiB/rank", "total/N MiB", "prompt diff"], train))
    gen = [[res.dtype, str(r.ranks), str(r.generation["examples"]),
            str(r.generation["max_new_tokens"]), f"{r.generation['batched']:.1f}",
            f"{r.generation['per_client']:.1f}",
            f"{r.generation['batched'] / r.generation['per_client']:.1f}x",
            f"{generation_ceiling(r.generation, machine_peak(res.gemm_peak, r.ranks)):.1f}x"]
           for res in results for r in res.rows if r.generation]
    out.append(("Generation: every test client's prompt on its own test set",
                ["dtype", "ranks", "examples", "new tokens", "batched ex/s",
                 "client by client ex/s", "ratio", "ceiling"], gen))
    goals = [[name, how, f"{value:.2f}", "" if ceiling is None else f"{ceiling:.2f}",
              "met" if ok else "NOT met"]
             for res in results for name, how, value, ceiling, ok in targets(res)]
    out.append(("Targets (issue 4)", ["target", "measured", "value", "ceiling", "status"],
                goals))
    return out


LEFT = ("variant", "target", "measured", "dtype")


def print_tables(tabs: Sequence[Table]) -> None:
    from rich.console import Console
    from rich.table import Table as RichTable

    console = Console()
    for title, header, body in tabs:
        table = RichTable(title=title)
        for h in header:
            table.add_column(h, justify="left" if h in LEFT else "right")
        for row in body:
            table.add_row(*row)
        console.print(table)


def markdown(tabs: Sequence[Table], w: Workload, repeats: int, command: str) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
               platform.processor())
    versions = ", ".join(f"{p} {md.version(p)}" for p in
                         ("torch", "deepspeed", "transformers", "peft"))
    lines = [SECTION, "", WORKLOAD_TEXT.format(w=w, repeats=repeats), ""]
    for title, header, body in tabs:
        lines += [f"**{title}**", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join("---" if h in LEFT else "---:" for h in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body] + [""]
    lines += [f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} CPUs ({cpu}), "
              f"shared with other jobs (1-minute load average at the end: "
              f"{os.getloadavg()[0]:.1f}); Python {platform.python_version()}, {versions}; "
              f"{datetime.date.today().isoformat()}.", "", f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


WORKLOAD_TEXT = (
    "Workload: FedAvg (Adam clients, lr {w.client_lr}, batch {w.batch_size}, {w.local_epochs} "
    "local epoch), {w.clients_per_round} built-in train clients per round "
    "({w.instances_per_task} instances per task), {w.prompt_tokens} virtual tokens; backbone: "
    "random-init Llama, 4 layers, 512 wide, vocabulary 1,009. `peft` is the OpenFedLLM-style "
    "loop (get_peft_model, per client: load the global prompt, fresh Adam, train, read back), "
    "data parallel at N ranks with a whole model on each, transformers' default attention "
    "(SDPA); `peft-eager` (bf16 only) is that loop with the attention kernel profit-ds picks "
    "for bf16 on a CPU (eager); `K=1`, `K=auto` are profit-ds on a ZeRO-3 backbone at 2 ranks "
    "and the whole model at 1 rank (as `profit-ds run` does). s/round: the best of {w.rounds} rounds after a warm-up round, in each of "
    "{repeats} run(s) of the variant in rotation with the others (the machine is shared; the "
    "best round is the least disturbed); CPU s/round: that round's CPU time, all ranks. tokens/s: source + target tokens trained "
    "on (not padding, not virtual tokens). MFU: the FLOPs each variant needs (forward, backward "
    "to the inputs only, LM head at label positions only; `peft`: `[prompt ; text]` per row; "
    "profit-ds: each client's prompt once per local step, rows attending to its cached keys "
    "and values) per second over the best square-matmul rate "
    "measured in the same run, same dtype, all cores. Peak RSS: the largest rank's, after "
    "training. `prompt diff`: relative difference of the final global prompt from the table's "
    "first row (the same work in every variant, so float rounding only). Ceiling: the best "
    "ratio any implementation could reach on this machine, with the faster side at the GEMM "
    "peak (training: its FLOPs as in the MFU column; generation: a lower bound on them, the "
    "weights' forward over each row's prompt and source) and the slower side as measured.")


def write_section(path: Path, figures: str) -> None:
    """Put `figures` at the head of this benchmark's section of the Markdown file: everything
    from the section's title to END_OF_FIGURES is replaced; hand-written notes after that
    marker and the other sections are kept. A file without the section gets it appended."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    block = f"{figures.rstrip()}\n\n{END_OF_FIGURES}\n"
    generated = re.compile(rf"^{re.escape(SECTION)}\n.*?^{re.escape(END_OF_FIGURES)}\n",
                           re.S | re.M)
    whole = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if generated.search(text):
        text = generated.sub(lambda _: block, text)
    elif whole.search(text):
        text = whole.sub(lambda _: block + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    p.add_argument("--dtypes", default="fp32,bf16", help="backbone dtypes (default fp32,bf16)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"a subset of {','.join(VARIANTS)} (targets need the first three; "
                        "peft-eager runs only where profit-ds picks eager attention)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (default 3)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every variant this many times in rotation, keep each one's best")
    p.add_argument("--instances-per-task", type=int, default=40)
    p.add_argument("--clients-per-round", type=int, default=12)
    p.add_argument("--write-docs", type=Path, help="rewrite this section of the Markdown file")
    p.add_argument("--json", type=Path, help="also write every figure as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return
    with tempfile.TemporaryDirectory(prefix="profit-ds-bench-") as scratch:
        model_dir = Path(scratch) / "model"
        build_model(model_dir)
        w = Workload(str(model_dir), instances_per_task=args.instances_per_task,
                     clients_per_round=args.clients_per_round, rounds=args.rounds)
        results = [measure(replace(w, dtype=d), [int(n) for n in args.ranks.split(",")],
                           args.variants.split(","), args.repeats, Path(scratch),
                           lambda msg: print(msg, flush=True))
                   for d in args.dtypes.split(",")]
    tabs = tables(w, results)
    print_tables(tabs)
    if args.json:
        args.json.write_text(json.dumps({"workload": asdict(w),
                                         "results": [asdict(r) for r in results]}, indent=2))
    if args.write_docs:
        command = "python scripts/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        write_section(args.write_docs, markdown(tabs, w, args.repeats, command.strip()))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
