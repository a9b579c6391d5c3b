"""Our greedy decoding (evaluation.generate.greedy) against transformers' own `generate`.

`greedy` drops each row from the batch once it has emitted EOS; `generate` keeps computing
finished rows. In fp32 both must give the same tokens for every row, whichever step each row
stops at, from the same left-padded embeddings (a prompt's embeddings before each source)."""
from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from profit_ds.evaluation.generate import greedy

NEW_TOKENS = 12


def _model_and_batch() -> tuple[LlamaForCausalLM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)).eval()
    lengths = [9, 7, 7, 5, 4, 3]  # left padding differs per row
    embeds = torch.randn(len(lengths), max(lengths), 32)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for r, n in enumerate(lengths):
        embeds[r, : max(lengths) - n] = 0.0
        mask[r, max(lengths) - n:] = 1
    return model, embeds, mask


def _hf(model, embeds, mask, eos: int) -> list[list[int]]:
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0,
                              eos_token_id=eos)
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
    rows = []
    for row in out.tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_greedy_equals_generate_while_rows_stop_at_different_steps():
    model, embeds, mask = _model_and_batch()
    free = _hf(model, embeds, mask, eos=-1)  # no row stops: which tokens come when
    # an EOS that ends some rows early, others later, and leaves some running to the limit
    steps = {t: [row.index(t) if t in row else None for row in free]
             for t in {t for row in free for t in row}}
    eos = max(steps, key=lambda t: len({s for s in steps[t]}))
    stops = steps[eos]
    assert None in stops and len({s for s in stops if s is not None}) >= 2, stops

    with torch.no_grad():
        ours = greedy(model, embeds, mask, NEW_TOKENS, eos)
    assert ours == _hf(model, embeds, mask, eos)
    assert sorted(len(r) for r in ours) != [NEW_TOKENS] * len(ours)  # rows did stop early
