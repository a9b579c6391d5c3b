"""Results must not depend on how the work is scheduled: the number of clients per batched step
(K) or the number of ranks only change float rounding (DESIGN.md point 3), nor on computing each
client's prompt once per step instead of once per row. And the bf16 backbone must train the fp32
prompt in the same direction as the fp32 backbone.

Every run here is tiny (2-layer, 32-wide model; 4 clients of 8 examples; 2 rounds; 2-token
generations): the point is the comparison, not the scores.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import UNTRAINED, flags
from profit_ds.adapters.prompt import PROMPT
from profit_ds.config import resolve
from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.format import to_example
from profit_ds.fl.gradients import forward_chunks, mean_loss_gradients
from profit_ds.model.prompted import IGNORE, Encoded, client_loss_sums, collate, encode
from profit_ds.runner import run

RTOL = 1e-5
TINY = dict(UNTRAINED, rounds=2, clients_per_round=4, instances_per_task=10, batch_size=4,
            client_opt="adam", client_lr=0.05, personalize_lrs=[0.5, 2.0], personalize_epochs=1,
            eval_every=0, max_new_tokens=2, prompt_tokens=8)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Matrices this small gain nothing from a second thread, and on a shared machine a
    preempted OpenMP thread stalls every kernel (seen: 10 ms per tiny matmul)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompts(out: Path) -> dict[str, torch.Tensor]:
    """Every state a run wrote: the global one and each client's per-lr personalized ones
    (a prompt, or LoRA's A and B per module)."""
    tensors = {f"global/{k}": v for path in out.glob("global_*.safetensors")
               for k, v in load_file(path).items()}
    for path in sorted((out / "clients").glob("*.safetensors")):
        tensors.update({f"{path.stem}/{k}": v for k, v in load_file(path).items()})
    return tensors


def _assert_same_prompts(a: Path, b: Path, rtol: float = RTOL) -> None:
    """Every state the runs wrote agrees to `rtol` relative; rtol 0: bit for bit."""
    pa, pb = _prompts(a), _prompts(b)
    assert pa.keys() == pb.keys() and len(pa) > 1
    for name in pa:
        rel = float((pa[name] - pb[name]).norm() / pa[name].norm())
        assert (torch.equal(pa[name], pb[name]) if rtol == 0 else rel < rtol), \
            f"{name}: relative difference {rel:.2e}"


def _rows(tokenizer, clients: int) -> list[tuple[int, Encoded]]:
    """(client, example) rows of the first built-in tasks, one client per task."""
    tasks = builtin_tasks(instances_per_task=6)[:clients]
    return [(k, e) for k, t in enumerate(tasks)
            for e in encode(tokenizer, [to_example(t, i) for i in t.instances])]


def _prompt_grads(backbone, bank: torch.Tensor, rows, rows_per_forward: int):
    """`mean_loss_gradients` of a prompt bank given as a tensor; the gradient as a tensor."""
    grads, losses = mean_loss_gradients(backbone, {"prompt": bank}, rows, rows_per_forward)
    return grads["prompt"], losses


def _bank(k: int, hidden: int) -> torch.Tensor:
    return torch.randn(k, 4, hidden, generator=torch.Generator().manual_seed(0)) * 0.1


def _run_in_process(model_dir: Path, out: Path, **settings) -> Path:
    run(resolve(None, {"model": str(model_dir), "output_dir": str(out), **TINY, **settings}))
    return out


# LoRA under both algorithms, its plain mean under FedSGD and FedSA's under FedAvg (a
# fedavg-lora case too took 19 s of a suite kept under 15 minutes, and no code of its own)
SETTINGS = [{"algo": "fedavg"}, {"algo": "fedsgd"}, {"algo": "scaffold"},
            {"algo": "fedsgd", "adapter": "lora"},
            {"algo": "fedavg", "adapter": "lora", "lora_aggregation": "fedsa"}]
# ranks: a FedAvg prompt runs the same sharded code as SCAFFOLD's (local steps, a prompt
# bank) and as FedAvg's LoRA (the server mean): its own 2-rank case (19 s) adds none
TWO_RANK_SETTINGS = SETTINGS[1:]


def _ids(settings: dict) -> str:
    return "-".join(settings.values())


@pytest.fixture(scope="module")
def one_rank_k8(request, tiny_model_dir, tmp_path_factory, backbone) -> tuple[dict, Path]:
    """The reference run: 1 rank, K=8 (all 4 clients of a round in one step, personalization
    pairs 8 at a time)."""
    settings = request.param
    out = tmp_path_factory.mktemp("-".join(settings.values()) + "-k8")
    return settings, _run_in_process(tiny_model_dir, out, clients_in_parallel="8", **settings)


@pytest.mark.parametrize("one_rank_k8", SETTINGS, ids=_ids, indirect=True)
def test_k1_and_k8_give_the_same_prompts(one_rank_k8, tiny_model_dir, tmp_path):
    settings, reference = one_rank_k8
    k1 = _run_in_process(tiny_model_dir, tmp_path / "k1", clients_in_parallel="1", **settings)
    _assert_same_prompts(reference, k1)


def test_k1_and_k8_are_bit_identical_on_the_built_in_model(tmp_path):
    """The built-in model with its own settings (P 20, personalization lrs 1, 30 and 300,
    where SGD amplifies any rounding difference: before units and eager attention, K=1 and
    K=8 ended 2e-2 apart at lr 30 on the default run, seed 5). Not a tolerance: the same bits,
    at 2 threads, what a run takes on this 2-core machine (at 1 thread some prompts still
    differ by about 1e-7: docs/RELIABILITY.md, Determinism)."""
    def prompts(k: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"k{k}"
        run(resolve(None, dict(rounds=2, clients_per_round=8, instances_per_task=16,
                               personalize_epochs=1, eval_every=0, max_new_tokens=2, seed=5,
                               clients_in_parallel=k, output_dir=str(out))))
        return _prompts(out)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # this module runs at 1 thread (`one_thread`)
    try:
        one, eight = prompts("1"), prompts("8")
    finally:
        torch.set_num_threads(before)
    assert one.keys() == eight.keys() and any("lr=300" in name for name in one)
    for name in one:
        assert torch.equal(one[name], eight[name]), name


@pytest.mark.parametrize("one_rank_k8", TWO_RANK_SETTINGS, ids=_ids, indirect=True)
def test_one_and_two_ranks_give_the_same_bits(one_rank_k8, tiny_model_dir, tmp_path):
    settings, reference = one_rank_k8
    out = tmp_path / "two-ranks"
    res = subprocess.run([sys.executable, "-m", "profit_ds", "run", "--num-procs", "2",
                          "--model", str(tiny_model_dir), "--clients-in-parallel", "8",
                          "--output-dir", str(out), *flags({**TINY, **settings})],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # not a tolerance: 1 rank runs the plain model, 2 ranks ZeRO-3, and the plain model sums
    # its gradients in ZeRO-3's order (model/zero3_order.py); the ranks themselves change no
    # bit (test_two_zero3_ranks_give_the_bits_of_one). Without that order: 1.2e-7 apart
    # (prompts), 3.7e-6 (LoRA, fedavg)
    _assert_same_prompts(reference, out, rtol=0.0)


RANK_WORKER = """
import sys, torch
from profit_ds import distributed
from profit_ds.memory import ForwardLimit
from profit_ds.model.backbone import load_backbone
from profit_ds.fl.gradients import mean_loss_gradients
from profit_ds.adapters.lora import LoraAdapter
distributed.setup()
torch.set_num_threads(1)
given = torch.load(sys.argv[2], weights_only=False)  # the test wrote it
backbone = load_backbone(sys.argv[1])
backbone.limit = ForwardLimit(backbone.forward_limit().costs, 2**40, given["max_tokens"])
out = {"prompt": mean_loss_gradients(backbone, given["prompt"], given["rows"], 64),
       "lora": mean_loss_gradients(backbone, given["lora"], given["rows"], 64, LoraAdapter())}
if distributed.is_main():
    torch.save(out, sys.argv[3])
"""


def test_two_zero3_ranks_give_the_bits_of_one(backbone, tiny_model_dir, tmp_path):
    """Ranks change no bit: the gradients and losses of prompt and LoRA banks at 2 ZeRO-3
    ranks (each its share of the units, summed in float64) equal those of one ZeRO-3 rank.
    What separates a 1-rank run from a 2-rank one is that one rank runs the plain model,
    whose backward differs from ZeRO-3's in the last bits (docs/RELIABILITY.md)."""
    from profit_ds.adapters.lora import LoraAdapter
    from profit_ds.fl.state import expand
    from profit_ds.memory import ForwardLimit

    gen = torch.Generator().manual_seed(3)
    lora = {n: t + 0.05 * torch.randn(t.shape, generator=gen)
            for n, t in expand(LoraAdapter().init(backbone, 0), 6).items()}
    given = {"rows": _rows(backbone.tokenizer, clients=6), "lora": lora, "max_tokens": 5 * 40,
             "prompt": {"prompt": _bank(6, backbone.hidden_size)}}
    torch.save(given, tmp_path / "given.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    ranks = {**env, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": str(29500 + os.getpid() % 500)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_WORKER, str(tiny_model_dir),
                               str(tmp_path / "given.pt"), str(tmp_path / "two.pt")],
                              env={**ranks, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors[0][-2000:]
    two = torch.load(tmp_path / "two.pt")
    before, limit = backbone.limit, backbone.forward_limit()
    backbone.limit = ForwardLimit(limit.costs, 2**40, given["max_tokens"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, adapter in (("prompt", PROMPT), ("lora", LoraAdapter())):
            grads, losses = mean_loss_gradients(backbone, given[name], given["rows"], 64, adapter)
            assert torch.equal(losses, two[name][1]), name
            for leaf, g in grads.items():
                assert torch.equal(g, two[name][0][leaf]), (name, leaf)
    finally:
        backbone.limit = before
        torch.set_num_threads(threads)


def test_a_clients_gradient_is_bit_identical_alone_and_among_others(backbone):
    """The rounding of K: with forwards of a few rows, a client's rows alone and among five
    other clients' land in different forwards with different paddings; its gradient and loss
    must not change in any bit (units, float64 unit sums, eager attention: fl/gradients.py)."""
    from profit_ds.memory import ForwardLimit

    rows = _rows(backbone.tokenizer, clients=6)
    rows.append((1, Encoded(tuple(range(5, 60)), (7, 8, backbone.tokenizer.eos_token_id))))
    bank = _bank(6, backbone.hidden_size)
    before = backbone.limit
    limit = backbone.forward_limit()
    backbone.limit = ForwardLimit(limit.costs, limit.memory, 5 * 40)  # about 5 rows a forward
    try:
        together, losses = _prompt_grads(backbone, bank, rows, 64)
        assert len(forward_chunks(rows, 4, 64, backbone.limit)) > 6  # clients share forwards
        for k in range(6):
            alone, loss = _prompt_grads(backbone, bank, [r for r in rows if r[0] == k], 64)
            assert torch.equal(alone[k], together[k]) and torch.equal(loss[k], losses[k]), k
    finally:
        backbone.limit = before


def test_shared_prompt_pass_equals_the_concatenated_sequence(reference_model, backbone):
    """client_loss_sums computes each client's prompt once and reuses its KV cache for the
    client's rows; the loss and prompt gradient must equal the textbook forward of
    `[prompt ; tokens]` per row through the whole model."""
    rows = _rows(backbone.tokenizer, clients=3)
    batch = collate([e for _, e in rows], [c for c, _ in rows], backbone.tokenizer.pad_token_id)
    bank = _bank(4, backbone.hidden_size).requires_grad_(True)  # client 3 has no rows
    ours = client_loss_sums(reference_model, bank, batch)
    (ours_grad,) = torch.autograd.grad(ours.sum(), bank)
    embeds = reference_model.get_input_embeddings()(batch.input_ids)
    mask = torch.cat([torch.ones(len(rows), bank.shape[1], dtype=torch.long),
                      batch.attention_mask], dim=1)
    logits = reference_model(inputs_embeds=torch.cat([bank[batch.row_client], embeds], dim=1),
                             attention_mask=mask).logits[:, bank.shape[1]:-1]
    token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch.labels[:, 1:],
                                                   ignore_index=IGNORE, reduction="none")
    textbook = torch.zeros(4).index_add(0, batch.row_client, token_loss.sum(1))
    (textbook_grad,) = torch.autograd.grad(textbook.sum(), bank)
    assert torch.allclose(ours, textbook, rtol=1e-5)
    assert float((ours_grad - textbook_grad).norm() / textbook_grad.norm()) < RTOL


def _graph_ops(root: torch.Tensor) -> set[str]:
    """Names of every autograd node that backward will run from `root`."""
    seen, todo = set(), [root.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_gradient_path_has_no_order_dependent_scatter(reference_model, backbone):
    """A step's prompt gradient must be bit-reproducible: the backward of advanced indexing
    (IndexBackward0, an index_put with accumulation) adds rows sharing an index with parallel
    float atomics on CPU, in an order that varies between runs (profit_ds/model/prompted.py);
    so the training graph must not contain it. Several rows per client make the duplicates."""
    rows = _rows(backbone.tokenizer, clients=3)
    batch = collate([e for _, e in rows], [c for c, _ in rows], backbone.tokenizer.pad_token_id)
    bank = _bank(3, backbone.hidden_size).requires_grad_(True)
    ops = _graph_ops(client_loss_sums(reference_model, bank, batch).sum())
    assert "IndexSelectBackward0" in ops  # the graph was walked: the gathers are in it
    assert not {op for op in ops if op.startswith(("IndexBackward", "IndexPutBackward"))}


@pytest.fixture(scope="module")
def bf16_backbone(tiny_model_dir, backbone):
    from profit_ds.model.backbone import load_backbone
    return load_backbone(str(tiny_model_dir), "bf16")


def test_bf16_gradient_is_close_to_fp32(backbone, bf16_backbone):
    assert next(bf16_backbone.model.parameters()).dtype == torch.bfloat16
    rows = _rows(backbone.tokenizer, clients=3)
    bank = _bank(3, backbone.hidden_size)
    g32, loss32 = _prompt_grads(backbone, bank, rows, 64)
    g16, loss16 = _prompt_grads(bf16_backbone, bank, rows, 64)
    assert g16.dtype == torch.float32 and loss16.dtype == torch.float32  # fp32 master state
    for k in range(3):
        cos = torch.nn.functional.cosine_similarity(g16[k].flatten(), g32[k].flatten(), dim=0)
        rel = (g16[k] - g32[k]).norm() / g32[k].norm()
        assert cos > 0.99 and rel < 0.1, f"client {k}: cosine {cos:.4f}, relative {rel:.3f}"
    assert torch.allclose(loss16, loss32, rtol=2e-2)


def test_bf16_on_cpu_uses_eager_attention_with_sdpa_gradients(backbone, bf16_backbone):
    """CPU flash attention (SDPA's pick) is several times slower than eager in bf16
    (backbone.attention_implementation); eager must give the same gradients up to bf16
    rounding."""
    model = bf16_backbone.model
    assert model.config._attn_implementation == "eager"
    rows = _rows(backbone.tokenizer, clients=3)
    bank = _bank(3, backbone.hidden_size)
    eager, _ = _prompt_grads(bf16_backbone, bank, rows, 64)
    model.set_attn_implementation("sdpa")
    try:
        sdpa, _ = _prompt_grads(bf16_backbone, bank, rows, 64)
    finally:
        model.set_attn_implementation("eager")
    assert eager.abs().sum() > 0
    for k in range(3):
        rel = (eager[k] - sdpa[k]).norm() / sdpa[k].norm()
        assert rel < 0.02, f"client {k}: eager vs sdpa relative gradient difference {rel:.3f}"


def test_bf16_forwards_past_eager_keys_take_sdpa(backbone, bf16_backbone, monkeypatch):
    """Eager attention saves H x (4 + b) bytes of scores per (position, key); a forward
    attending to more keys than `eager_keys` (memory.eager_up_to) takes SDPA, which saves
    none, and the memory model counts the scores only below that length."""
    calls: list[int] = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    costs = bf16_backbone.forward_limit().costs
    limit, prompt = costs.eager_keys, 4
    assert 0 < limit < bf16_backbone.model.config.max_position_embeddings - prompt - 8
    short = _rows(backbone.tokenizer, clients=1)[:2]
    assert max(len(e.source) + len(e.target) for _, e in short) + prompt <= limit
    _prompt_grads(bf16_backbone, _bank(1, backbone.hidden_size), short, 64)
    assert not calls  # eager
    source = tuple(range(5, 5 + limit - prompt))  # with its target: past the limit
    longest = [(0, Encoded(source, (7, 8, backbone.tokenizer.eos_token_id)))]
    grads, _ = _prompt_grads(bf16_backbone, _bank(1, backbone.hidden_size), longest, 64)
    assert calls and grads.abs().sum() > 0
    assert bf16_backbone.model.config._attn_implementation == "eager"  # restored after
    assert costs.key_bytes(limit) == limit * costs.train_key > 0 and costs.key_bytes(limit + 1) == 0


def test_an_offload_config_keeps_zero3_at_one_rank(tiny_model_dir, backbone, bf16_backbone):
    """Parameter offload is ZeRO-3's (the shards live in CPU RAM), so one rank with that config
    still gets DeepSpeed; its gradients match the whole bf16 model's up to bf16 rounding."""
    from profit_ds.model.backbone import load_backbone

    offloaded = load_backbone(str(tiny_model_dir), "bf16", ds_config="zero3_gpu_bf16_offload")
    assert offloaded.engine is not None and bf16_backbone.engine is None
    assert all(hasattr(p, "ds_id") for p in offloaded.model.parameters())
    rows = _rows(backbone.tokenizer, clients=3)
    bank = _bank(3, backbone.hidden_size)
    sharded, _ = _prompt_grads(offloaded, bank, rows, 64)
    whole, _ = _prompt_grads(bf16_backbone, bank, rows, 64)
    assert whole.abs().sum() > 0
    assert (sharded - whole).norm() / whole.norm() < 0.02


def test_bf16_run_end_to_end(tiny_model_dir, tmp_path, bf16_backbone):
    out = _run_in_process(tiny_model_dir, tmp_path / "bf16", dtype="bf16",
                          clients_in_parallel="auto")
    prompts = _prompts(out)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in prompts.values())
    assert prompts["global/prompt"].shape == (8, bf16_backbone.hidden_size)
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dtype"] == "bf16"
    assert all(math.isfinite(r["train_loss"]) for r in results["rounds"])


def _largest_share(lengths: list[int], bounds: list[int]) -> int:
    return max(((b - a) * max(lengths[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a),
               default=0)


@pytest.mark.parametrize("parts", [2, 3])
def test_rank_shares_cover_every_row_once_and_balance_padded_size(parts):
    """Shares are contiguous, in order, cover every row, and their largest padded size
    (rows x longest) is the smallest any contiguous cut gives (brute force)."""
    import itertools

    from profit_ds.distributed import balanced_shares

    gen = torch.Generator().manual_seed(parts)
    for n in (0, 1, 2, 5, 13):
        lengths = sorted(torch.randint(3, 60, (n,), generator=gen).tolist(), reverse=True)
        shares = balanced_shares(lengths, parts)
        assert len(shares) == parts
        bounds = [0] + [s.stop for s in shares]
        assert [s.start for s in shares] == bounds[:-1] and bounds[-1] == n
        best = min(_largest_share(lengths, [0, *cut, n])
                   for cut in itertools.combinations_with_replacement(range(n + 1), parts - 1))
        assert _largest_share(lengths, bounds) == best
    # the longest rows get a smaller share of the rows than the short ones
    first, second = balanced_shares([45] * 20 + [30] * 76, 2)
    assert first.stop - first.start < second.stop - second.start
