"""The benchmark's arithmetic (scripts/bench.py): its timings are never tested (a shared
machine is noisy), but the figures it derives from them are."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def _row(bench, variant: str, ranks: int, seconds: float, mfu: float, generation=None):
    return bench.Measured(variant, ranks, 1, seconds, seconds, 1.0, mfu, 0, 50, 100, 0.0, 0.0,
                          generation)


def test_ceilings_bound_the_ratios_and_equal_them_at_full_mfu(bench):
    peak = 100.0
    gen = {"batched": 40.0, "per_client": 20.0, "examples": 64, "prefill_flops": 64.0}
    rows = [_row(bench, "K=1", 2, 9.0, 0.4), _row(bench, "K=auto", 2, 6.0, 0.6, gen),
            _row(bench, "peft", 2, 8.0, 0.7)]
    found = {name.split(": ")[-1]: (value, ceiling)
             for name, _, value, ceiling, _ in bench.targets(bench.DtypeResult("fp32", peak,
                                                                               rows))}
    value, ceiling = found["K=auto >= 2.5x faster per round than K=1"]
    assert value == pytest.approx(1.5) and ceiling == pytest.approx(9.0 / (0.6 * 6.0))
    value, ceiling = found["K=auto >= 1.5x faster than PEFT"]
    assert ceiling == pytest.approx(8.0 / 3.6) and ceiling > value
    # generation: 64 examples at 20/s client by client = 3.2 s; 64 FLOPs at 100/s = 0.64 s
    value, ceiling = found["batched evaluation >= 3x client by client"]
    assert value == pytest.approx(2.0) and ceiling == pytest.approx(3.2 / 0.64)
    # had K=auto run at the GEMM peak, its measured ratio would be its ceiling
    full = [rows[0], _row(bench, "K=auto", 2, 6.0, 1.0, gen), rows[2]]
    for name, _, value, ceiling, _ in bench.targets(bench.DtypeResult("fp32", peak, full)):
        if "than K=1" in name or "than PEFT" in name:
            assert ceiling == pytest.approx(value)


def test_lora_target_is_peft_loras_over_ours_with_its_own_ceiling(bench):
    """Measured without any prompt variant; at each rank count; the eager loop's where run."""
    rows = [_row(bench, "lora-K=auto", 1, 4.0, 0.25), _row(bench, "peft-lora", 1, 7.0, 0.3),
            _row(bench, "peft-lora-eager", 1, 5.0, 0.3), _row(bench, "lora-K=auto", 2, 4.0, 0.5),
            _row(bench, "peft-lora", 2, 8.0, 0.4)]
    result = bench.DtypeResult("bf16", 1.0, rows)
    got = {name: (how, value, ceiling, ok)
           for name, how, value, ceiling, ok in bench.targets(result)}
    target = "LoRA K=auto >= 1.5x faster than PEFT's LoRA loop"
    eager = f"{target}, both with eager attention"
    assert set(got) == {f"bf16, 1 rank: {target}", f"bf16, 1 rank: {eager}",
                        f"bf16, 2 ranks: {target}"}
    # ours at the peak: 0.25 x 4 s = 1 s against PEFT's 7 s
    assert got[f"bf16, 1 rank: {target}"] == (
        "PEFT-LoRA s / LoRA K=auto s", pytest.approx(7 / 4), pytest.approx(7.0), True)
    assert got[f"bf16, 2 ranks: {target}"][1:] == (pytest.approx(2.0), pytest.approx(4.0), True)
    assert got[f"bf16, 1 rank: {eager}"] == (
        "PEFT-LoRA-eager s / LoRA K=auto s", pytest.approx(1.25), pytest.approx(5.0), False)


def test_state_diff_takes_the_worst_kind_of_leaf(bench):
    """LoRA's B (from 0: all training) is not hidden by the size of A's init."""
    import torch

    ref = {"m.0.q.lora_A": torch.full((2, 4), 10.0), "m.1.q.lora_A": torch.full((2, 4), 10.0),
           "m.0.q.lora_B": torch.ones(4, 2), "m.1.q.lora_B": torch.ones(4, 2)}
    moved = {**ref, "m.1.q.lora_B": torch.full((4, 2), 1.5)}
    # B: |0.5 x 8| / |1 x 16| = sqrt(2) / 4 (A unchanged)
    assert bench.state_diff(moved, ref) == pytest.approx(2 ** 0.5 / 4)
    assert bench.state_diff(ref, ref) == 0.0
    prompt = {"prompt": torch.ones(3, 4)}
    assert bench.state_diff({"prompt": 2 * torch.ones(3, 4)}, prompt) == pytest.approx(1.0)
    assert {bench.adapter_of(v) for v in bench.VARIANTS} == {"prompt", "lora"}
    assert [v for v in bench.VARIANTS if bench.adapter_of(v) == "lora"] == [
        "lora-K=auto", "peft-lora", "peft-lora-eager"]


def test_prefill_flops_count_weights_and_one_lm_head_position(bench):
    config = SimpleNamespace(hidden_size=4, num_key_value_heads=2, num_attention_heads=2,
                             intermediate_size=8, num_hidden_layers=3, vocab_size=10)
    rows = [SimpleNamespace(source=(1, 2, 3)), SimpleNamespace(source=(1,))]
    per_layer = 4 * 4 * 2 + 4 * 4 * 2 + 3 * 4 * 8  # q, o; k, v; gate, up, down
    weights = 3 * per_layer
    expected = sum(2 * weights * (5 + len(r.source)) + 2 * 4 * 10 for r in rows)
    assert bench.prefill_flops(config, 5, rows) == expected


def _smollm2_config():
    from transformers import AutoConfig

    from profit_ds.model.aliases import ALIASES

    return AutoConfig.for_model(**ALIASES["smollm2-135m"].config)


def test_smollm2_flops_count_its_gqa_matrices_and_one_tied_head(bench):
    config = _smollm2_config()
    # one layer by hand: q and o 576 x (9 x 64); k and v 576 x (3 x 64); gate, up, down 576 x 1536
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert per_layer == 3_538_944 == bench.layer_weights(config)
    assert bench.linear_flops(config, 7) == 4 * 7 * 30 * per_layer
    assert bench.lm_head_flops(config, 3) == 4 * 3 * 576 * 49_152
    # scores and values per query head (9 of them), not per KV head
    assert bench.attention_flops(config, 5, 11) == 12 * 30 * 5 * 11 * 9 * 64
    # the matrices counted, the norms and the one tied embedding / LM head matrix make up
    # exactly SmolLM2-135M's 134,515,008 parameters: nothing counted twice or left out
    norms = 30 * 2 * 576 + 576
    assert 30 * per_layer + 576 * 49_152 + norms == 134_515_008
    # LoRA r 8 on q (576 -> 576) and v (576 -> 192): r (d_in + d_out) per layer, 6 FLOPs each
    # per token (forward, backward to the input, to A and B)
    lora = bench.lora_adapter(bench.Workload("unused"))
    assert lora.floats(bench.dims(config)) == 30 * 8 * (576 + 576 + 576 + 192) == 460_800
    assert bench.lora_flops(config, lora, 7) == 6 * 7 * 460_800
    row = SimpleNamespace(source=(1,) * 100, target=(2,) * 9)
    assert bench.lora_row_flops(config, lora, row) == (
        4 * 109 * 30 * per_layer + 12 * 30 * 109 * 109 * 576 + 4 * 9 * 576 * 49_152
        + 6 * 109 * 460_800)
    assert bench.row_flops(config, 20, row) == (
        4 * 129 * 30 * per_layer + 12 * 30 * 129 * 129 * 576 + 4 * 9 * 576 * 49_152)
    assert bench.shared_row_flops(config, 20, row) == (
        4 * 109 * 30 * per_layer + 12 * 30 * 109 * 129 * 576 + 4 * 9 * 576 * 49_152)


def test_linear_flops_match_the_weights_of_a_built_gqa_model(bench):
    """A head_dim that is not hidden / heads, GQA, tied embeddings: the count is the model's
    own matrices (4 FLOPs per weight per token: forward, backward to the inputs)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    weights = sum(m.weight.numel() for m in model.model.layers.modules()
                  if isinstance(m, torch.nn.Linear))
    assert bench.linear_flops(config, 1) == 4 * weights
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: one matrix
    assert bench.lm_head_flops(config, 1) == 4 * model.lm_head.weight.numel()


def test_round_work_runs_each_clients_prompt_once_per_step(bench):
    config = _smollm2_config()
    rows = lambda n: [SimpleNamespace(source=(1,) * 30, target=(2,) * 5) for _ in range(n)]
    data = SimpleNamespace(train_clients=[SimpleNamespace(train=rows(3)),
                                          SimpleNamespace(train=rows(9))])
    w = bench.Workload("unused", clients_per_round=2, batch_size=8, local_epochs=1,
                       prompt_tokens=20)
    tokens, flops = bench.round_work(data, w, 1, config)
    assert tokens == 12 * 35
    prompt_pass = bench.linear_flops(config, 20) + bench.attention_flops(config, 20, 20)
    steps = 1 + 2  # 3 rows: one step; 9 rows in batches of 8: two
    row = rows(1)[0]
    assert flops["K=auto"] == flops["K=1"] == pytest.approx(
        steps * prompt_pass + 12 * bench.shared_row_flops(config, 20, row))
    assert flops["peft"] == pytest.approx(12 * bench.row_flops(config, 20, row))
    # LoRA: every row alone, the same work in both loops
    lora = 12 * bench.lora_row_flops(config, bench.lora_adapter(w), row)
    assert flops["lora-K=auto"] == flops["peft-lora"] == flops["peft-lora-eager"] == \
        pytest.approx(lora)
    assert set(flops) == set(bench.VARIANTS)


def test_generation_target_is_the_rate_ratio_with_a_prefill_ceiling(bench):
    def gen(seconds, flops=0.0):
        return {"examples": 10, "seconds": seconds, "prefill_flops": flops,
                "predictions": ["a"] * 10}

    for ours, met in (([5.0, 4.0], True), ([6.0], False)):
        result = bench.DtypeResult("bf16", 100.0, [], {"generate": gen(ours, 100.0),
                                                       "hf-generate": gen([4.5, 5.0])})
        (name, _, value, ceiling, ok), = bench.targets(result)
        assert "within 1.2x of plain HF" in name
        assert value == pytest.approx(4.5 / min(ours)) and ok is met
        # plain HF's 4.5 s against profit-ds's 100 FLOPs at 100 FLOP/s
        assert ceiling == pytest.approx(4.5)
    assert bench.same_predictions(gen([1.0]), {**gen([1.0]), "predictions": ["a"] * 9 + ["b"]}) == 9


def test_smollm2_section_is_added_after_the_toy_one_and_rewritten_alone(bench, tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Training and generation\n\ntoy v1\n\n"
                   f"{bench.END_OF_FIGURES}\n\ntoy notes\n")
    smol = dict(section=bench.SMOLLM2_SECTION, end=bench.SMOLLM2_END)
    bench.write_section(doc, f"{bench.SMOLLM2_SECTION}\n\nsmol v1", **smol)
    doc.write_text(doc.read_text() + "\nsmol notes\n")  # hand-written, after its marker
    bench.write_section(doc, f"{bench.SMOLLM2_SECTION}\n\nsmol v2", **smol)
    bench.write_section(doc, f"{bench.SECTION}\n\ntoy v2")
    text = doc.read_text()
    assert "smol v1" not in text and "toy v1" not in text
    assert text.index("toy v2") < text.index("toy notes") < text.index("smol v2") \
        < text.index("smol notes")


def test_smollm2_workload_runs_with_a_pretrained_models_run_defaults(bench, tmp_path):
    from profit_ds.config import REAL_MODEL_DEFAULTS

    w = bench.Workload(str(tmp_path), name="smollm2", dtype="fp32", data_dir=str(tmp_path),
                       clients_per_round=4, client_lr=REAL_MODEL_DEFAULTS["client_lr"])
    cfg = bench.run_config(w, "1")
    assert (cfg.dtype, cfg.clients_in_parallel, cfg.prompt_init) == ("fp32", "1", "text")
    assert (cfg.max_source_tokens, cfg.max_target_tokens) == (1024, 128)
    assert (cfg.heterogeneity, cfg.max_per_client, cfg.chat_template) == ("task", 24, None)
    assert cfg.client_lr == REAL_MODEL_DEFAULTS["client_lr"]
    toy = bench.run_config(bench.Workload(str(tmp_path)))
    assert (toy.max_source_tokens, toy.max_target_tokens, toy.client_lr) == (256, 64, 0.03)
    # LoRA: the workload's client lr (not LORA_DEFAULTS'), the adapter's settings
    lora = bench.run_config(w, "auto", "lora")
    assert (lora.adapter, lora.lora_rank, lora.lora_alpha, lora.lora_targets,
            lora.lora_aggregation, lora.client_lr) == (
        "lora", 8, 16.0, "q_proj,v_proj", "fedit", REAL_MODEL_DEFAULTS["client_lr"])


def test_lora_variants_start_alike_and_agree_after_a_round(bench, tiny_model_dir):
    """`lora-K=auto` and `peft-lora-eager`, in this process on the 2-layer test model, one
    round of 3 clients: the same LoRA init reaches both (PEFT under its own key names, or
    PEFT's own random A would make them differ by far more) and they end at the same state but
    for float rounding (K=auto batches the 3 clients; PEFT takes them one by one)."""
    from profit_ds.model.ds_config import without_zero_init

    w = bench.Workload(str(tiny_model_dir), instances_per_task=8, clients_per_round=3, rounds=0)
    ours = bench.run_variant("lora-K=auto", w)
    with without_zero_init():  # a ZeRO-3 test backbone in this session: keep PEFT's model whole
        theirs = bench.run_variant("peft-lora-eager", w)
    assert ours["k"] == 3 and theirs["k"] == 1
    start = bench.lora_adapter(w).init(SimpleNamespace(model=_plain(tiny_model_dir)), w.seed)
    for got in (ours, theirs):
        assert got["states"]["first"] is got["states"]["final"]  # rounds=0: the warm-up only
        assert got["states"]["final"].keys() == start.keys()
        assert bench.state_diff(got["states"]["final"], start) > 0.01  # it trained
    assert bench.state_diff(ours["states"]["final"], theirs["states"]["final"]) < 1e-4


def _plain(model_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig.from_pretrained(model_dir))  # modules, names only


def test_a_lora_only_run_writes_the_lora_sections_and_keeps_the_prompt_ones(bench, tmp_path):
    """Each workload's prompt and LoRA variants have sections of their own, so a run of the
    LoRA variants alone (at 1 rank, say) does not overwrite the prompt figures."""
    toy = bench.Workload(str(tmp_path))
    smol = bench.Workload(str(tmp_path), name="smollm2", data_dir=str(tmp_path))

    def result(*variants):
        return [bench.DtypeResult("bf16", 1.0, [_row(bench, v, 1, 2.0, 0.5) for v in variants])]

    both = bench.doc_sections({"toy": (toy, result("K=1", "K=auto", "peft", "lora-K=auto",
                                                   "peft-lora"))}, 1, 1)
    assert [s[2] for s in both] == [bench.SECTION, bench.LORA_SECTION]
    (prompt_tabs, *_), (lora_tabs, lora_text, *_) = both
    assert [r[1] for r in prompt_tabs[0][2]] == ["K=1", "K=auto", "peft"]
    assert [r[1] for r in lora_tabs[0][2]] == ["lora-K=auto", "peft-lora"]
    assert "r 8, alpha 16, on q_proj,v_proj" in lora_text
    doc = tmp_path / "BENCHMARKS.md"
    for tabs, text, section, end in both:
        bench.write_section(doc, f"{section}\n\n{text}", section, end)
    lora_only = bench.doc_sections({"toy": (toy, result("lora-K=auto", "peft-lora")),
                                    "smollm2": (smol, result("lora-K=auto", "peft-lora"))}, 1, 1)
    assert [s[2] for s in lora_only] == [bench.LORA_SECTION, bench.SMOLLM2_LORA_SECTION]
    assert "Targets (SmolLM2-135M, LoRA)" in [t[0] for t in lora_only[1][0]]
    for tabs, text, section, end in lora_only:
        bench.write_section(doc, f"{section}\n\nnew {section}", section, end)
    written = doc.read_text()
    assert bench.WORKLOAD_TEXT.format(w=toy, repeats=1)[:60] in written  # the prompt's kept
    assert f"new {bench.LORA_SECTION}" in written and lora_text not in written
