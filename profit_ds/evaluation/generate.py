"""Batched greedy generation with per-row client states (DESIGN.md point 5).

Rows of many (state, example) pairs share each generation batch: row r is left-padded, then
its prompt `bank[k_r]` (prompt tuning), then its source tokens, so every row's prompt sits
right before its text, as in training; LoRA applies row r's adapter inside the backbone
(`adapters/lora.py`), following the rows as finished ones leave. `greedy` decodes with the KV cache as transformers' greedy `generate`
does (position ids from the attention mask), and drops each row from the batch once it is
done. Under ZeRO-3 with several ranks each rank generates its share of every batch
(contiguous in length order, balanced by padded size; the KV cache's memory is balanced with
it), and all ranks keep joining the parameter all-gathers until the slowest row is done.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Sequence

import torch

from profit_ds import distributed
from profit_ds.adapters.base import Adapter
from profit_ds.adapters.prompt import PROMPT
from profit_ds.evaluation.rouge import score_predictions
from profit_ds.fl.clients import EvalSet
from profit_ds.fl.state import State
from profit_ds.memory import call_rows, release_freed_memory
from profit_ds.model.backbone import Backbone
from profit_ds.model.kv_cache import ReservedCache
from profit_ds.model.prompted import Encoded, model_device, select_cache_rows


def _left_padded_inputs(backbone: Backbone, prefix: torch.Tensor | None,
                        jobs: Sequence[tuple[int, Encoded]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row r: left padding, `prefix[k_r]` (a prompt, if the adapter has one), the source
    tokens; on the model's device."""
    pad = backbone.tokenizer.pad_token_id
    num_prompt = 0 if prefix is None else prefix.shape[1]
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
        if num_prompt:
            embeds[r, n_pad: n_pad + num_prompt] = prefix[k].to(embeds.device, embeds.dtype)
        embeds[r, n_pad + num_prompt:] = token_embeds[r, n_pad:]
        mask[r, n_pad:] = 1
    return embeds, mask


@torch.no_grad()
def generate(backbone: Backbone, bank: State, jobs: Sequence[tuple[int, Encoded]],
             max_new_tokens: int, batch_rows: int,
             advance: Callable[[int], None] | None = None, adapter: Adapter = PROMPT,
             batch_tokens: int | None = None) -> list[str]:
    """Greedy continuations (decoded, stripped) for `jobs` = (bank index, encoded example),
    row r under its client state `bank[k_r]` through `adapter`, in calls of at most
    `batch_rows` rows and `batch_tokens` padded positions per rank (`_calls`).

    A job repeated in `jobs` (the same bank row and source) is generated once: a client's
    local test set is part of the global one, and personalization scores a prompt on both
    (a ninth of its rows on the SNI sample). `advance` still counts every job.

    With SDPA attention whatever the training kernel: without a backward pass it is the faster
    one on CPUs in bf16 too (SmolLM2 prefill 1.6 s against eager's 2.95 s, docs/BENCHMARKS.md).
    """
    world = distributed.world()
    first: dict[tuple[int, tuple[int, ...]], int] = {}
    copy_of = [first.setdefault((k, e.source), i) for i, (k, e) in enumerate(jobs)]
    copies = Counter(copy_of)
    order = sorted(copies, key=lambda i: -len(jobs[i][1].source))
    extra = adapter.extra_tokens(bank) + max_new_tokens
    lengths = [extra + len(jobs[i][1].source) for i in order]
    texts: list[str] = [""] * len(jobs)
    with backbone.attention("sdpa"):
        for start, stop in _calls(lengths, batch_rows, batch_tokens, world):
            batch = order[start: stop]
            _generate_batch(backbone, adapter, bank, jobs, batch, max_new_tokens, texts)
            release_freed_memory()  # this batch's KV cache, before the next one's
            if advance:
                advance(sum(copies[i] for i in batch))
    return [texts[i] for i in copy_of]


def _calls(lengths: Sequence[int], rows: int, tokens: int | None,
           world: int) -> list[tuple[int, int]]:
    """(start, stop) of each generate call over rows of `lengths` padded positions (prompt,
    source and new tokens), longest first: at most `rows` rows per rank and, given `tokens`,
    at most that many padded positions per rank (a call pads every row to its first).

    The token bound keeps the calls of long rows small, whose KV cache and prefill are the
    bulk of a run's memory, while short rows still share a call by the `rows`: the
    padded positions of a call, not its rows, are what its time and memory follow."""
    calls, start = [], 0
    while start < len(lengths):
        stop = min(len(lengths), start + call_rows(rows, tokens, lengths[start]) * world)
        calls.append((start, stop))
        start = stop
    return calls


def _generate_batch(backbone: Backbone, adapter: Adapter, bank: State,
                    jobs: Sequence[tuple[int, Encoded]], idx: list[int], max_new_tokens: int,
                    texts: list[str]) -> None:
    """Generate jobs `idx` (this rank's share of them) into `texts`."""
    tok = backbone.tokenizer
    extra = adapter.extra_tokens(bank)
    # a row costs its padded prefill and its decoding steps
    mine = idx[distributed.my_share([extra + len(jobs[i][1].source) + max_new_tokens
                                     for i in idx])]
    # an idle rank still generates (one dummy row) to stay in lock-step under ZeRO-3
    batch = [jobs[i] for i in mine] or [jobs[idx[0]]]
    embeds, mask = _left_padded_inputs(backbone, adapter.prefix(bank), batch)
    row_client = torch.tensor([k for k, _ in batch])
    with adapter.rows(backbone.model, bank, row_client) as scope:
        tokens = greedy(backbone.model, embeds, mask, max_new_tokens, tok.eos_token_id,
                        synced=distributed.world() > 1, on_select=scope.select)
    decoded = [t.strip() for t in tok.batch_decode(tokens, skip_special_tokens=True)]
    for i, text in zip(idx, distributed.gather_lists(decoded[: len(mine)])):
        texts[i] = text


def greedy(model, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: int,
           synced: bool = False, on_select: Callable[[torch.Tensor], None] | None = None
           ) -> list[list[int]]:
    """Each row's greedy continuation of left-padded `embeds` (token ids, ending at its EOS).

    transformers' greedy `generate` with the KV cache, except that a row leaves the batch
    once it has emitted EOS: `generate` keeps computing finished rows until the last one is
    done, and on SNI the mean answer is a fifth of the longest (SmolLM2: 11 tokens of 52 per
    row, and 7% of rows run to the limit, so nearly every batch took every step). The same
    position ids (from the attention mask), the same masks and the same argmax as
    `generate`, so the same tokens (tested against it). `synced` (ZeRO-3 with several ranks,
    `generate`'s `synced_gpus`): every rank runs a forward at every step until all ranks
    are done, a rank without live rows on one dummy row, to join the parameter all-gathers.
    `on_select(keep)` hears which batch rows stay whenever rows leave (an adapter whose
    per-row state follows the rows: LoRA).
    """
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                cache=ReservedCache(embeds.shape[1] + max_new_tokens), use_cache=True,
                logits_to_keep=1)
    cache, last = out.cache, positions[:, -1]
    live = torch.arange(len(embeds))  # batch row -> row of `embeds`
    tokens: list[list[int]] = [[] for _ in range(len(embeds))]
    ghost = False  # the batch's one row is a finished one, kept for lock-step
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        if not ghost:
            for r, t in zip(live.tolist(), nxt.tolist()):
                tokens[r].append(t)
        keep = (nxt != eos).nonzero().squeeze(1) if not ghost else torch.zeros(0, dtype=torch.long)
        if step == max_new_tokens - 1 or not _anyone_left(len(keep), synced):
            break
        ghost = len(keep) == 0
        if ghost:
            keep = torch.zeros(1, dtype=torch.long)
        if len(keep) < len(live):
            live, nxt, mask, last = live[keep], nxt[keep], mask[keep], last[keep]
            select_cache_rows(cache, keep.to(mask.device))
            if on_select:
                on_select(keep)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        last = last + 1
        out = model(inputs_embeds=model.get_input_embeddings()(nxt.unsqueeze(1)),
                    attention_mask=mask, position_ids=last.unsqueeze(1), cache=cache,
                    use_cache=True)
    return tokens


def _anyone_left(live_rows: int, synced: bool) -> bool:
    """Whether a row on any rank still decodes (only this rank's, unless `synced`)."""
    if not synced:
        return live_rows > 0
    left = torch.tensor([float(live_rows)])
    distributed.all_reduce_sum(left)
    return bool(left.item() > 0)


def evaluate(backbone: Backbone, bank: State, requests: Sequence[tuple[int, EvalSet]],
             max_new_tokens: int, batch_rows: int,
             advance: Callable[[int], None] | None = None, adapter: Adapter = PROMPT,
             batch_tokens: int | None = None) -> list[dict]:
    """Score state `bank[k]` on each requested set; all requests share generation batches.

    Each result holds the set's ROUGE-L and exact match, and, for the predictions files,
    its "predictions" and "example_rouge_l" in the set's order."""
    jobs = [(k, e) for k, s in requests for e in s.encoded]
    texts = generate(backbone, bank, jobs, max_new_tokens, batch_rows, advance, adapter,
                     batch_tokens)
    results, start = [], 0
    for _, s in requests:
        chunk = texts[start: start + len(s)]
        results.append({**score_predictions(chunk, s.references, per_example=True),
                        "predictions": chunk})
        start += len(s)
    return results
