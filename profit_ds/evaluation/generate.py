"""Batched greedy generation with per-row soft prompts (DESIGN.md point 5).

Rows of many (prompt, example) pairs share each `generate` call: row r is left-padded, then its
prompt `bank[k_r]`, then its source tokens, so every row's prompt sits right before its text,
as in training. transformers' `generate` does greedy decoding with the KV cache and derives
position ids from the attention mask. Under ZeRO-3 with several ranks each rank generates its
share of every batch (contiguous in length order, balanced by padded size; the KV cache's
memory is balanced with it) with `synced_gpus=True`, so all ranks keep joining the parameter
all-gathers until the slowest row is done.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers import GenerationConfig

from profit_ds import distributed
from profit_ds.evaluation.rouge import score_predictions
from profit_ds.fl.clients import EvalSet
from profit_ds.memory import release_freed_memory
from profit_ds.model.backbone import Backbone
from profit_ds.model.prompted import Encoded, model_device


def _left_padded_inputs(backbone: Backbone, bank: torch.Tensor,
                        jobs: Sequence[tuple[int, Encoded]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r: left padding, `bank[k_r]`, the source tokens; on the model's device."""
    pad = backbone.tokenizer.pad_token_id
    num_prompt = bank.shape[1]
    length = max(len(e.source) for _, e in jobs)
    ids = torch.full((len(jobs), length), pad, dtype=torch.long)
    for r, (_, e) in enumerate(jobs):
        ids[r, length - len(e.source):] = torch.tensor(e.source)
    token_embeds = backbone.model.get_input_embeddings()(ids.to(model_device(backbone.model)))
    embeds = token_embeds.new_zeros(len(jobs), num_prompt + length, token_embeds.shape[-1])
    mask = torch.zeros(len(jobs), num_prompt + length, dtype=torch.long,
                       device=token_embeds.device)
    for r, (k, e) in enumerate(jobs):
        n_pad = length - len(e.source)
        embeds[r, n_pad: n_pad + num_prompt] = bank[k].to(embeds.device, embeds.dtype)
        embeds[r, n_pad + num_prompt:] = token_embeds[r, n_pad:]
        mask[r, n_pad:] = 1
    return embeds, mask


@torch.no_grad()
def generate(backbone: Backbone, bank: torch.Tensor, jobs: Sequence[tuple[int, Encoded]],
             max_new_tokens: int, batch_rows: int,
             advance: Callable[[int], None] | None = None) -> list[str]:
    """Greedy continuations (decoded, stripped) for `jobs` = (bank index, encoded example).

    With SDPA attention whatever the training kernel: without a backward pass it is the faster
    one on CPUs in bf16 too (SmolLM2 prefill 1.6 s against eager's 2.95 s, docs/BENCHMARKS.md).
    """
    tok = backbone.tokenizer
    world = distributed.world()
    order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][1].source))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts: list[str] = [""] * len(jobs)
    step = batch_rows * world
    with backbone.attention("sdpa"):
        for start in range(0, len(order), step):
            _generate_batch(backbone, bank, jobs, order[start: start + step], config, texts)
            release_freed_memory()  # this batch's KV cache, before the next one's
            if advance:
                advance(len(order[start: start + step]))
    return texts


def _generate_batch(backbone: Backbone, bank: torch.Tensor, jobs: Sequence[tuple[int, Encoded]],
                    idx: list[int], config: GenerationConfig, texts: list[str]) -> None:
    """Generate jobs `idx` (this rank's share of them) into `texts`."""
    tok = backbone.tokenizer
    world = distributed.world()
    # a row costs its padded prefill and its decoding steps
    mine = idx[distributed.my_share([bank.shape[1] + len(jobs[i][1].source)
                                     + config.max_new_tokens for i in idx])]
    # an idle rank still generates (one dummy row) to stay in lock-step under ZeRO-3
    batch = [jobs[i] for i in mine] or [jobs[idx[0]]]
    embeds, mask = _left_padded_inputs(backbone, bank, batch)
    out = backbone.model.generate(inputs_embeds=embeds, attention_mask=mask,
                                  generation_config=config, synced_gpus=world > 1)
    decoded = [t.strip() for t in tok.batch_decode(out.cpu(), skip_special_tokens=True)]
    for i, text in zip(idx, distributed.gather_lists(decoded[: len(mine)])):
        texts[i] = text


def evaluate(backbone: Backbone, bank: torch.Tensor, requests: Sequence[tuple[int, EvalSet]],
             max_new_tokens: int, batch_rows: int,
             advance: Callable[[int], None] | None = None) -> list[dict]:
    """Score prompt `bank[k]` on each requested set; all requests share generation batches.

    Each result holds the set's ROUGE-L and exact match, and, for the predictions files,
    its "predictions" and "example_rouge_l" in the set's order."""
    jobs = [(k, e) for k, s in requests for e in s.encoded]
    texts = generate(backbone, bank, jobs, max_new_tokens, batch_rows, advance)
    results, start = [], 0
    for _, s in requests:
        chunk = texts[start: start + len(s)]
        results.append({**score_predictions(chunk, s.references, per_example=True),
                        "predictions": chunk})
        start += len(s)
    return results
