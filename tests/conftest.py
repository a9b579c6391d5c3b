"""Shared fixtures: a tiny random-init Llama saved locally (no hub), and its ZeRO-3 backbone.

The backbone fixture is session-scoped: DeepSpeed's process group and its ZeRO-3 wrapping are
paid once per test session.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from profit_ds.config import REAL_MODEL_DEFAULTS, field_default
from profit_ds.model.builtin import BUILTIN_DIR

SNI_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "sni-sample" / "tasks"
# The random test models are no pretrained LLMs, and their context is 512 tokens: they run with
# the built-in model's settings, where a model directory would otherwise get a pretrained
# model's defaults (config.REAL_MODEL_DEFAULTS)
UNTRAINED = {key: field_default(key) for key in REAL_MODEL_DEFAULTS}


def flags(settings: dict) -> list[str]:
    """The CLI spelling of a settings dict."""
    out = []
    for key, value in settings.items():
        value = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        out += [f"--{key.replace('_', '-')}", value]
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with the built-in tokenizer, written to a temp dir."""
    out = tmp_path_factory.mktemp("tiny_random")
    tok = AutoTokenizer.from_pretrained(BUILTIN_DIR)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def backbone(tiny_model_dir):
    """ZeRO-3 even at one rank (where a run would use the whole model), so that the tests
    that take it check DeepSpeed's sharded forward and backward against plain references."""
    from profit_ds.model.backbone import load_backbone
    return load_backbone(str(tiny_model_dir), "fp32", zero3=True)


@pytest.fixture(scope="session")
def reference_model(tiny_model_dir):
    """The same weights as a plain, unsharded PyTorch model (built directly, not through
    from_pretrained, which would partition it while a ZeRO-3 config is registered)."""
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(tiny_model_dir))
    model.load_state_dict(load_file(tiny_model_dir / "model.safetensors"), strict=False)
    model.tie_weights()
    return model.eval().requires_grad_(False)
