"""Budgets from the model and the memory free (profit_ds.memory): the planner and the run take
them from the same code, a run never plans past its memory budget, and activation
checkpointing changes only float rounding."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from profit_ds import memory
from profit_ds import plan as planning
from profit_ds.evaluation.generate import Batching
from profit_ds.fl.gradients import forward_chunks, mean_loss_gradients
from profit_ds.model.prompted import Encoded

GB = memory.GB


def _rows(n: int, source: int, target: int, clients: int = 4) -> list[tuple[int, Encoded]]:
    return [(i % clients, Encoded(tuple(range(3, 3 + source - i % 7)), tuple(range(target))))
            for i in range(n)]


def _chunk_bytes(costs: memory.TokenCosts, chunk, prompt: int) -> int:
    longest = max(len(e.source) + len(e.target) for _, e in chunk)
    return costs.train(len(chunk), longest, prompt + longest, sum(len(e.target) for _, e in chunk))


def _rows_of(forwards):
    """Each forward's rows (a forward is a list of units, each a list of rows)."""
    return [[row for unit in units for row in unit] for units in forwards]


def test_llama_7b_on_one_80gb_gpu_run_budgets_fit_the_plan(monkeypatch):
    """What `profit-ds plan --model llama-7b --gpus 1` says fits, and what a run on that GPU
    does: the run reads the free memory after loading (mocked as the plan assumes it), sizes
    its budgets, cuts a step of full-length rows into forwards and batches its generation;
    every forward and generation batch fits the plan's activation term, the plan's total fits
    the GPU, and the run's K=auto is the plan's."""
    shape = planning.model_shape("llama-7b")
    work = planning.default_workload("llama-7b", 1)
    plan = planning.plan(shape, work, gpu_mem_gb=80)
    assert plan.fits and not plan.offload and plan.memory.total <= 80 * GB

    free_after_load = 80 * GB - planning.CUDA_CONTEXT - plan.memory.weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (free_after_load, 80 * GB))
    budget, _ = memory.free_memory("cuda")
    run = memory.budgets(shape.dims, "bf16", False, budget, "cuda",
                         planning.work_shape_of(work))
    assert run.clients_in_parallel == plan.clients_in_parallel
    assert run.tokens_per_forward == plan.budgets.tokens_per_forward

    target = work.target_tokens
    step = _rows(run.clients_in_parallel * work.micro_batch * 3, work.seq_len - target, target)
    chunks = _rows_of(forward_chunks(step, work.prompt_tokens, len(step), run.forward))
    assert sum(len(c) for c in chunks) == len(step)
    costs = run.forward.costs
    for chunk in chunks:
        assert _chunk_bytes(costs, chunk, work.prompt_tokens) <= plan.memory.activations
        assert _chunk_bytes(costs, chunk, work.prompt_tokens) <= run.memory
    context = work.prompt_tokens + work.seq_len - target
    rows_per_call = memory.call_rows(run.generation_rows, run.generation_tokens,
                                     context + target + 1)
    assert costs.generate(rows_per_call, context, target + 1) <= plan.memory.activations
    assert (plan.memory.weights + max(_chunk_bytes(costs, c, work.prompt_tokens) for c in chunks)
            + plan.memory.prompts + plan.memory.runtime) <= 80 * GB


@pytest.mark.parametrize("budget_gb", [0.002, 0.02, 0.2])
def test_budgets_never_exceed_the_given_memory(budget_gb):
    """With `--memory-budget`, every forward the run cuts and every generation batch it
    sizes fits the budget (a row too long for it alone turns activation checkpointing on)."""
    shape = planning.model_shape("smollm2-135m")
    rows = _rows(96, 300, 20)
    work = memory.work_shape([(len(e.source), len(e.target)) for _, e in rows], [300] * 8, 8,
                             20, 33, 1)
    limit, source = memory.free_memory("cpu", budget_gb)
    assert limit == int(budget_gb * GB) and "--memory-budget" in source
    b = memory.budgets(shape.dims, "bf16", True, limit, "cpu", work)
    single = b.forward.costs.train(1, work.longest_row, 20 + work.longest_row, 20)
    for chunk in _rows_of(forward_chunks(rows, 20, len(rows), b.forward)):
        fits = _chunk_bytes(b.forward.costs, chunk, 20) <= limit
        assert fits or (len(chunk) == 1 and single > limit)
    new = work.new_tokens
    batching = Batching(b.generation_rows, b.generation_tokens)
    for context in (20 + n for n in (300, 150, 60, 12)):  # a batch as wide as `context`
        rows = batching.room(0, context, new)
        assert b.forward.costs.generate(rows, context, new) <= limit or rows == 1
    plain = memory.token_costs(shape.dims, "bf16", True)
    needs = plain.train(1, work.longest_row, 20 + work.longest_row, 20) > limit
    assert b.checkpointing == needs


def test_a_personalization_group_fills_generate_calls_under_k_auto_only():
    """K=auto sized for training (1 client per forward) would score one pair per generate
    call; a group takes the pairs whose rows fill SCORING_CALLS calls, never more than there
    are; a K the user set is kept."""
    shape = planning.model_shape("smollm2-135m")
    work = memory.work_shape([(300, 20)] * 8, [300] * 8, 8, 20, 33, 1)
    b = memory.budgets(shape.dims, "bf16", True, 12 * GB, "cpu", work)
    assert b.clients_in_parallel == 1 and b.generation_rows == 64
    group = b.personalization_group(44.0, 16)
    assert group == -(-memory.SCORING_CALLS * 64 // 44) == 6
    assert b.personalization_group(44.0, 3) == 3
    assert b.personalization_group(10_000.0, 16) == 1
    from dataclasses import replace
    fixed = replace(b, k_fixed=True)
    assert fixed.personalization_group(44.0, 16) == 1


def test_run_with_a_small_memory_budget_records_and_honours_it(tmp_path):
    """A run given `--memory-budget` plans within it and says so in results.json."""
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "profit_ds", "run", "--rounds", "1", "--clients-per-round", "4",
         "--personalize-epochs", "1", "--personalize-lrs", "1", "--num-clients", "12",
         "--instances-per-task", "16", "--memory-budget", "0.01", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    budgets = json.loads((out / "results.json").read_text())["resolved"]["budgets"]
    assert budgets["memory_gb"] == 0.01 and "--memory-budget 0.01" in budgets["memory_source"]
    assert "budgets per rank: 0.01 GB" in (out / "run.log").read_text()


def test_activation_checkpointing_gives_the_same_gradients(backbone, reference_model):
    """The checkpointed path (every row as [prompt ; tokens], layers recomputed in backward)
    against the shared prompt pass: same per-client gradients and losses to float rounding,
    under ZeRO-3 (the backbone fixture) and on the plain whole model."""
    rows = [(c, e) for c, (_, e) in enumerate(_rows(6, 12, 3, clients=6))]
    rows = [(c % 3, Encoded(tuple(x % 500 + 4 for x in e.source), (5, 6, 2))) for c, e in rows]
    bank = torch.randn(3, 4, backbone.hidden_size, generator=torch.Generator().manual_seed(0))
    plain_grads, plain_loss = mean_loss_gradients(backbone, {"prompt": bank}, rows, len(rows))
    backbone.checkpointing = True
    try:
        ckpt_grads, ckpt_loss = mean_loss_gradients(backbone, {"prompt": bank}, rows, len(rows))
    finally:
        backbone.checkpointing = False
    plain_grads, ckpt_grads = plain_grads["prompt"], ckpt_grads["prompt"]
    assert torch.allclose(plain_loss, ckpt_loss, rtol=1e-5)
    assert float((plain_grads - ckpt_grads).norm() / plain_grads.norm()) < 1e-5

    from profit_ds.model.prompted import client_loss_sums, collate
    batch = collate([e for _, e in rows], [c for c, _ in rows], 0)

    def grad(checkpointing: bool) -> torch.Tensor:  # .backward(): reentrant checkpoints need it
        leaf = bank.clone().requires_grad_(True)
        client_loss_sums(reference_model, leaf, batch, checkpointing).sum().backward()
        return leaf.grad

    plain, ckpt = grad(False), grad(True)
    assert float((plain - ckpt).norm() / plain.norm()) < 1e-5
    assert not reference_model.training


_HEAP_PROBE = """
import torch
from profit_ds.memory import bound_native_caches
def rss_mb():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
fixed = bound_native_caches()
torch.empty(8 * 2**20, dtype=torch.uint8).fill_(1)  # freed: default glibc now heaps 8 MB
keep = []
for _ in range(50):  # 6 MB blocks among small live ones that pin the heap
    keep += [torch.ones(1000), torch.empty(6 * 2**20, dtype=torch.uint8).fill_(1)]
held = rss_mb()
keep = keep[0::2]
print(fixed, held - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="mallopt is glibc's: elsewhere bound_native_caches leaves the "
                           "allocator as it is and says so (False); CI runs on Linux")
def test_a_fixed_mmap_threshold_returns_freed_activation_sized_blocks():
    """With `bound_native_caches`, freeing 300 MB of 6 MB tensors among small live ones hands
    all of it back to the OS. glibc's default, once its threshold has risen past 6 MB, keeps
    them in the heap for reuse (in some runs of this probe, not all: when its threshold
    rises varies), the RSS a SmolLM2 run's training forwards left behind (docs/BENCHMARKS.md)."""
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True,
                         text=True, check=True).stdout.split()
    fixed, freed = out[0], float(out[1])
    assert fixed == "True" and freed > 250
