"""`--dtype auto`: bf16 only where the device multiplies it natively, recorded as concrete."""
from __future__ import annotations

import pytest
import torch

from profit_ds.config import build
from profit_ds.model import precision


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_cpus_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision.resolve_dtype("auto", torch.device("cpu")) == expected
    # a pretrained model's default is auto; the config holds what it resolved to
    assert build({"model": "smollm2-135m"}).dtype == expected
    assert build({"model": "smollm2-135m", "dtype": "auto"}).dtype == expected


def test_a_given_dtype_and_the_builtin_default_are_kept(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert build({"model": "smollm2-135m", "dtype": "bf16"}).dtype == "bf16"
    assert build({}).dtype == "fp32"
    assert precision.resolve_dtype("fp32", torch.device("cpu")) == "fp32"
