"""Our greedy decoding (evaluation.generate.greedy) against transformers' own `generate`.

`greedy` drops each row from the batch once it has emitted EOS; `generate` keeps computing
finished rows. In fp32 both must give the same tokens for every row, whichever step each row
stops at, from the same left-padded embeddings (a prompt's embeddings before each source)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.format import to_example
from profit_ds.evaluation import generate as generation
from profit_ds.evaluation.generate import generate, greedy
from profit_ds.model.backbone import Backbone, load_config_and_tokenizer
from profit_ds.model.builtin import BUILTIN_DIR
from profit_ds.model.ds_config import without_zero_init
from profit_ds.model.kv_cache import ReservedLayer
from profit_ds.model.prompted import encode

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


def _inputs(embeds: torch.Tensor, mask: torch.Tensor):
    """`greedy`'s `inputs`: rows of the left-padded batch, cut to their longest."""
    def rows_of(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = int(mask[rows].sum(1).max())
        return embeds[rows, -width:], mask[rows, -width:]
    return rows_of


def _eos_stopping_rows_at_different_steps(model, embeds, mask) -> int:
    free = _hf(model, embeds, mask, eos=-1)  # no row stops: which tokens come when
    # an EOS that ends some rows early, others later, and leaves some running to the limit
    steps = {t: [row.index(t) if t in row else None for row in free]
             for t in {t for row in free for t in row}}
    eos = max(steps, key=lambda t: len({s for s in steps[t]}))
    stops = steps[eos]
    assert None in stops and len({s for s in stops if s is not None}) >= 2, stops
    return eos


@pytest.mark.parametrize("rows, tokens", [(6, None), (2, None), (3, 3 * (9 + NEW_TOKENS))])
def test_greedy_equals_generate_while_rows_stop_and_join_at_different_steps(rows, tokens):
    """One batch of every row, or batches of 2 or 3 rows into which the next rows join as
    others finish (right-aligned against rows already 1-11 steps in): the tokens of
    `generate` on the whole batch, row for row. No forward holds more than `rows` rows or
    more than `tokens` positions of KV cache."""
    model, embeds, mask = _model_and_batch()
    eos = _eos_stopping_rows_at_different_steps(model, embeds, mask)
    lengths = mask.sum(1).tolist()
    forwards: list[tuple[int, int]] = []
    real = model.forward

    def counted(*args, **kwargs):
        forwards.append(tuple(kwargs["attention_mask"].shape))
        return real(*args, **kwargs)
    model.forward = counted
    with torch.no_grad():
        ours = greedy(model, _inputs(embeds, mask), lengths, NEW_TOKENS, eos,
                      generation.Batching(rows, tokens))
    del model.forward
    assert ours == _hf(model, embeds, mask, eos)
    assert sorted(len(r) for r in ours) != [NEW_TOKENS] * len(ours)  # rows did stop early
    assert max(r for r, _ in forwards) <= rows
    if tokens:
        assert all(r * w <= tokens for r, w in forwards)
    growing = [b[0] > a[0] for a, b in zip(forwards, forwards[1:])]
    assert any(growing) == (rows < len(lengths))  # rows joined a running batch


def test_batching_room_bounds_rows_and_positions():
    """A batch takes at most 4 rows and 1,000 positions (each row at the batch's width plus
    the new tokens); a row always fits an empty batch, however long."""
    b = generation.Batching(4, 1000)
    assert b.room(0, 950, 50) == 1 and b.room(0, 2000, 50) == 1
    assert b.room(0, 200, 50) == 4 and b.room(1, 200, 50) == 3 and b.room(4, 200, 50) == 0
    assert b.room(1, 450, 50) == 1 and b.room(2, 450, 50) == 0
    assert generation.Batching(4, None).room(3, 10**6, 50) == 1


def test_a_bound_on_positions_changes_batches_not_predictions(monkeypatch):
    """The trained built-in model, a prompt, rows of many lengths: batches bounded by
    positions (the longest rows alone, short ones together, joining as others finish) give
    the predictions of one batch of every row."""
    with without_zero_init():
        model = AutoModelForCausalLM.from_pretrained(BUILTIN_DIR).eval()
    _, tok = load_config_and_tokenizer("tiny")
    backbone = Backbone(model, None, tok, "tiny", torch.float32)
    torch.manual_seed(0)
    vocab = model.get_input_embeddings().weight.detach()
    bank = {"prompt": vocab[torch.randint(3, vocab.shape[0], (2, 8))].clone()}
    tasks = builtin_tasks(instances_per_task=2)[::3]
    enc = encode(tok, [to_example(t, i) for t in tasks for i in t.instances])
    jobs = [(k, e) for k in range(2) for e in enc]
    lengths = sorted({len(e.source) for e in enc})
    assert len(lengths) >= 4  # rows of several lengths, so batches differ in rows
    sizes: list[int] = []
    real = generation._prefill
    monkeypatch.setattr(generation, "_prefill",
                        lambda *a: sizes.append(len(a[2])) or real(*a))
    whole = generate(backbone, bank, jobs, 6, batch_rows=len(jobs))
    assert sizes == [len(jobs)]
    sizes.clear()
    bound = 2 * (8 + lengths[0] + 6)  # two of the shortest rows, one of the longest
    split = generate(backbone, bank, jobs, 6, batch_rows=len(jobs), batch_tokens=bound)
    assert split == whole and len(set(whole)) > 3
    assert sizes[0] == 1 and max(sizes) <= 2 and sum(sizes) == len(jobs)


@pytest.mark.parametrize("capacity", [12, 5])  # room for every step; too little: it grows
def test_a_reserved_cache_holds_what_dynamic_cache_holds(capacity):
    """Step by step, with rows dropped and repeated on the way, the reserved layer's keys and
    values are DynamicLayer's bit for bit (same shapes, so attention reads the same)."""
    torch.manual_seed(0)
    reserved, dynamic = ReservedLayer(capacity), DynamicLayer()
    rows = 4
    for step, (length, keep) in enumerate([(6, None), (1, None), (1, [0, 2, 3]), (1, [2, 0]),
                                           (1, [0, 0, 1]), (1, None)]):
        if keep is not None:
            rows = len(keep)
            reserved.select_rows(torch.tensor(keep))
            dynamic.keys, dynamic.values = (t.index_select(0, torch.tensor(keep))
                                            for t in (dynamic.keys, dynamic.values))
        k, v = torch.randn(rows, 2, length, 3), torch.randn(rows, 2, length, 3)
        for got, want in zip(reserved.update(k, v), dynamic.update(k, v)):
            assert got.shape == want.shape and torch.equal(got, want), step
        assert reserved.get_seq_length() == dynamic.get_seq_length()
