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
