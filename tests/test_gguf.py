"""GGUF backbones (`--model FILE.gguf`, `--model smollm2-135m`): a tiny GGUF file the test
writes itself with the `gguf` package's writer, loaded as profit-ds loads it (converted once
into a cached folder, checked on later loads), gives the source model's logits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from profit_ds.model import gguf as profit_gguf
from profit_ds.model.aliases import ALIASES, resolve_model
from profit_ds.model.builtin import BUILTIN_DIR


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's layout of a q/k projection (what its converter writes; transformers
    undoes it when it reads the file)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_gguf(path: Path) -> tuple[LlamaForCausalLM, object]:
    """A 2-layer random Llama with the built-in byte-level BPE tokenizer, as an F32 GGUF."""
    import gguf

    tok = AutoTokenizer.from_pretrained(BUILTIN_DIR)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    vocab = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(vocab["vocab"], key=vocab["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in tok.all_special_tokens else
                       gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in names.items():
            t = state[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif theirs == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{theirs}.weight", t)
    w.add_tensor("output_norm.weight", state["model.norm.weight"])
    w.add_tensor("output.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, tok


@pytest.fixture()
def tiny_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("PROFIT_DS_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    model, tok = write_tiny_gguf(path)
    return path, model, tok


def test_gguf_file_loads_converted_once_with_the_source_logits(tiny_gguf):
    from profit_ds.model.backbone import load_backbone

    path, source, tok = tiny_gguf
    ref = resolve_model(str(path))
    assert ref.kind == "gguf" and ref.location == str(path.resolve())
    lines: list[str] = []
    folder = profit_gguf.hf_folder(path, say=lines.append)
    assert any("converting tiny.gguf" in line for line in lines)
    assert (folder / profit_gguf.MANIFEST).is_file()
    backbone = load_backbone(str(path), "fp32")
    ids = torch.tensor([tok("Definition: classify.\nInput: a b c\nOutput:")["input_ids"]])
    with torch.no_grad():
        ours = backbone.model(input_ids=ids).logits
        theirs = source(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=1e-5), float((ours - theirs).abs().max())
    assert backbone.tokenizer(" hello")["input_ids"] == tok(" hello")["input_ids"]
    again: list[str] = []
    assert profit_gguf.hf_folder(path, say=again.append) == folder and again == []


def test_damaged_conversion_is_redone(tiny_gguf):
    path, _, _ = tiny_gguf
    folder = profit_gguf.hf_folder(path, say=lambda line: None)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # cut short, as a killed copy would be
    lines: list[str] = []
    assert profit_gguf.hf_folder(path, say=lines.append) == folder
    assert any("converting again" in line for line in lines)
    assert profit_gguf._intact(folder)


def test_smollm2_alias_uses_the_packaged_gguf_when_installed():
    alias = ALIASES["smollm2-135m"]
    packaged = __import__("profit_ds.model.aliases", fromlist=["x"]).packaged_gguf(alias)
    ref = resolve_model("smollm2-135m")
    if packaged is None:  # not installed: the hub id
        assert ref.kind == "alias" and ref.location == "HuggingFaceTB/SmolLM2-135M-Instruct"
    else:
        assert ref.kind == "gguf" and ref.location.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
