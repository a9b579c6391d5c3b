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
    return bench.Measured(variant, ranks, 1, seconds, seconds, 1.0, mfu, 0, 50, 100, 0.0,
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
    row = SimpleNamespace(source=(1,) * 100, target=(2,) * 9)
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
