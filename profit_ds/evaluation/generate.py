"""Batched greedy generation with per-row client states (DESIGN.md point 5).

Rows of many (state, example) pairs share each generation batch: row r is left-padded, then
its prompt `bank[k_r]` (prompt tuning), then its source tokens, so every row's prompt sits
right before its text, as in training; LoRA applies row r's adapter inside the backbone
(`adapters/lora.py`), following the rows as they leave and join. `greedy` decodes with the KV
cache as transformers' greedy `generate` does (position ids from the attention mask), drops
each row from the batch once it is done and brings the next rows in as room frees up
(continuous batching). Under ZeRO-3 with several ranks each rank generates its share of the
rows (contiguous in length order, balanced by padded size), and all ranks keep joining the
parameter all-gathers until the slowest row is done.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
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
    row r under its client state `bank[k_r]` through `adapter`, continuously batched
    (`greedy`) within `Batching(batch_rows, batch_tokens)` per rank.

    A job repeated in `jobs` (the same bank row and source) is generated once: a client's
    local test set is part of the global one, and personalization scores a prompt on both
    (a ninth of its rows on the SNI sample). `advance` still counts every job.

    With SDPA attention whatever the training kernel: without a backward pass it is the faster
    one on CPUs in bf16 too (SmolLM2 prefill 1.6 s against eager's 2.95 s, docs/BENCHMARKS.md).
    """
    first: dict[tuple[int, tuple[int, ...]], int] = {}
    copy_of = [first.setdefault((k, e.source), i) for i, (k, e) in enumerate(jobs)]
    copies = Counter(copy_of)
    order = sorted(copies, key=lambda i: -len(jobs[i][1].source))
    extra = adapter.extra_tokens(bank)
    share = order[distributed.my_share([extra + len(jobs[i][1].source) + max_new_tokens
                                        for i in order])]
    # an idle rank still generates (one dummy row) to stay in lock-step under ZeRO-3
    mine = share or order[:1]
    prefix = adapter.prefix(bank)
    clients = torch.tensor([jobs[i][0] for i in mine])
    counted = 0

    def finished(r: int) -> None:
        nonlocal counted
        if advance and share:
            counted += copies[mine[r]]
            advance(copies[mine[r]])

    with backbone.attention("sdpa"), adapter.rows(backbone.model, bank, clients) as scope:
        tokens = greedy(backbone.model,
                        lambda rows: _left_padded_inputs(backbone, prefix,
                                                         [jobs[mine[r]] for r in rows]),
                        [extra + len(jobs[i][1].source) for i in mine], max_new_tokens,
                        backbone.tokenizer.eos_token_id, Batching(batch_rows, batch_tokens),
                        synced=distributed.world() > 1,
                        on_rows=lambda rows: scope.set_rows(clients.index_select(0, rows)),
                        on_finished=finished)
    release_freed_memory()  # the KV cache's room
    decoded = [t.strip() for t in backbone.tokenizer.batch_decode(
        tokens[: len(share)], skip_special_tokens=True)]
    texts: list[str] = [""] * len(jobs)
    for i, text in zip(order, distributed.gather_lists(decoded)):
        texts[i] = text
    if advance and len(jobs) > counted:  # other ranks' rows
        advance(len(jobs) - counted)
    return [texts[i] for i in copy_of]


@dataclass(frozen=True)
class Batching:
    """How many rows decode together on a rank: at most `rows`, holding at most `tokens`
    positions of KV cache in all (None: rows alone bound it), each row counted at the
    batch's width plus `max_new_tokens` (the room a row that joins now may need); one row
    at the least, however long.

    The token bound keeps batches of long rows small, whose KV cache and prefill are the
    bulk of a run's memory, while short rows share a batch up to the rows: the padded
    positions of a batch, not its rows, are what its time and memory follow."""

    rows: int
    tokens: int | None

    def room(self, live: int, width: int, max_new_tokens: int) -> int:
        """Rows that may join a batch of `live` rows once it is `width` positions wide."""
        return max(0 if live else 1,
                   call_rows(self.rows, self.tokens, width + max_new_tokens) - live)


JOIN_SHARE = 4  # rows join a running batch once a 1/JOIN_SHARE of a fresh batch's rows can


@dataclass
class _Batch:
    """The rows decoding together: their KV cache, attention mask (right-aligned: a row's
    positions end at the batch's last), last position ids, row numbers (into the rows being
    generated), and the token each feeds next. A ghost batch is one finished row kept only
    so that this rank joins the other ranks' forwards (ZeRO-3 with several ranks)."""

    cache: ReservedCache
    mask: torch.Tensor
    last: torch.Tensor
    rows: torch.Tensor
    nxt: torch.Tensor
    ghost: bool = False

    def span(self) -> int:
        """The positions some row still attends to: the longest row's, at the right end."""
        return int(self.mask.sum(1).max())

    def keep(self, idx: torch.Tensor) -> None:
        """Keep batch rows `idx` (in place)."""
        select_cache_rows(self.cache, idx.to(self.mask.device))
        self.mask = self.mask.index_select(0, idx.to(self.mask.device))
        self.last = self.last.index_select(0, idx.to(self.last.device))
        self.rows, self.nxt = self.rows.index_select(0, idx), self.nxt.index_select(0, idx)

    def join(self, other: "_Batch", max_new_tokens: int) -> None:
        """Take `other`'s rows in after this batch's, both right-aligned in one batch as wide
        as the longer of any row's positions, with room for `max_new_tokens` more."""
        keep = self.span()  # the leading positions no row attends to go
        width = max(keep, other.mask.shape[1])
        self.cache.join(other.cache, keep, width + max_new_tokens)
        mask = self.mask.new_zeros(len(self.rows) + len(other.rows), width)
        mask[: len(self.rows), width - keep:] = self.mask[:, self.mask.shape[1] - keep:]
        mask[len(self.rows):, width - other.mask.shape[1]:] = other.mask
        self.mask = mask
        self.last = torch.cat([self.last, other.last])
        self.rows, self.nxt = torch.cat([self.rows, other.rows]), torch.cat([self.nxt, other.nxt])


def greedy(model, inputs: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
           lengths: Sequence[int], max_new_tokens: int, eos: int, batching: Batching,
           synced: bool = False, on_rows: Callable[[torch.Tensor], None] | None = None,
           on_finished: Callable[[int], None] | None = None) -> list[list[int]]:
    """Each row's greedy continuation (token ids, ending at its EOS), continuously batched.

    Row i has `lengths[i]` positions (rows come longest first) and `inputs(rows)` gives the
    left-padded embeddings and attention mask of those rows. transformers' greedy `generate`
    with the KV cache, except in which rows share a forward: `generate` computes every row
    of a batch until its last is done, and on SNI the mean answer is a fifth of the longest
    (SmolLM2: 11 tokens of 52 per row, and 7% of rows run to the limit). Here a row leaves
    the batch once it has emitted EOS, and once a quarter of a fresh batch's rows fit
    (`Batching`, `JOIN_SHARE`) the next rows are prefilled and join it (their keys and
    values right-aligned with the batch's, `ReservedCache.join`), so the decoding steps,
    whose time on a CPU hardly grows with their rows, stay full. The same position ids
    (from each row's attention mask), the same masked keys and the same argmax as
    `generate`, so the same tokens (tested against it). `synced` (ZeRO-3 with several
    ranks, `generate`'s `synced_gpus`): every rank runs every forward until all are done,
    a rank without rows of its own on a dummy or ghost row, to join the parameter
    all-gathers. `on_rows(rows)` hears which rows are in the next forward whenever that
    changes (an adapter whose per-row state lives in the model: LoRA); `on_finished(i)`
    when row i is done.
    """
    tokens: list[list[int]] = [[] for _ in lengths]
    pending = 0  # the next row to join
    batch: _Batch | None = None

    def pick(b: _Batch, logits: torch.Tensor) -> _Batch | None:
        """Record each row's next token; drop the finished rows (all but a ghost of one,
        if `synced`); None if none is left."""
        b.nxt = logits[:, -1].argmax(-1)
        done = torch.ones(len(b.rows), dtype=torch.bool)
        if not b.ghost:
            for j, (r, t) in enumerate(zip(b.rows.tolist(), b.nxt.tolist())):
                tokens[r].append(t)
                done[j] = t == eos or len(tokens[r]) == max_new_tokens
                if done[j] and on_finished:
                    on_finished(r)
        keep = (~done).nonzero().squeeze(1)
        if len(keep) == 0 and not synced:
            return None
        if len(keep) == 0:
            b.ghost, keep = True, torch.zeros(1, dtype=torch.long)
        if len(keep) < len(b.rows):
            b.keep(keep)
        return b

    while True:
        live = 0 if batch is None or batch.ghost else len(batch.rows)
        joining = _joining(batching, batch if live else None, lengths, pending, max_new_tokens)
        join, anyone = _agree(joining > 0, live > 0 or pending < len(lengths), synced)
        if not anyone:
            break
        if join:
            rows = list(range(pending, pending + joining)) or [0]  # [0]: a dummy, discarded
            pending += joining
            new, logits = _prefill(model, inputs, rows, 0 if live else max_new_tokens, on_rows)
            if not joining:
                new.ghost = True
            new = pick(new, logits)
            if new is not None and live and not new.ghost:
                batch.join(new, max_new_tokens)
            elif new is not None and not live:  # it replaces a ghost, if there was one
                batch = new
        if batch is None or (batch.ghost and not synced):
            continue
        if on_rows:
            on_rows(batch.rows)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(len(batch.rows), 1)], dim=1)
        batch.last = batch.last + 1
        out = model(inputs_embeds=model.get_input_embeddings()(batch.nxt.unsqueeze(1)),
                    attention_mask=batch.mask, position_ids=batch.last.unsqueeze(1),
                    cache=batch.cache, use_cache=True)
        batch = pick(batch, out.logits)
    return tokens


def _prefill(model, inputs: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]],
             rows: list[int], room: int, on_rows: Callable[[torch.Tensor], None] | None
             ) -> tuple[_Batch, torch.Tensor]:
    """A batch of `rows` after their prefill, with room for `room` more positions, and the
    logits of each row's last position (`nxt` is set from them by `pick`)."""
    embeds, mask = inputs(rows)
    ids = torch.tensor(rows)
    if on_rows:
        on_rows(ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                cache=ReservedCache(embeds.shape[1] + room), use_cache=True, logits_to_keep=1)
    return _Batch(out.cache, mask, positions[:, -1], ids, ids), out.logits


def _joining(batching: Batching, batch: _Batch | None, lengths: Sequence[int], pending: int,
             max_new_tokens: int) -> int:
    """How many of the rows from `pending` on join `batch` (None: no live rows) now: all
    that fit, once that is a `JOIN_SHARE`-th of a fresh batch's rows or all that are left;
    at least one into an empty batch, none while a join would hardly fill the batch."""
    if pending == len(lengths):
        return 0
    if batch is None:
        return min(len(lengths) - pending, batching.room(0, lengths[pending], max_new_tokens))
    width = max(batch.span(), lengths[pending])
    fit = min(len(lengths) - pending, batching.room(len(batch.rows), width, max_new_tokens))
    fresh = batching.room(0, lengths[pending], max_new_tokens)
    return fit if fit >= min(len(lengths) - pending, max(1, fresh // JOIN_SHARE)) else 0


def _agree(join: bool, left: bool, synced: bool) -> tuple[bool, bool]:
    """Whether any rank joins rows now, and whether any has rows left (only this rank's,
    unless `synced`): every rank then runs the same forwards."""
    if not synced:
        return join, left
    flags = torch.tensor([float(join), float(left)])
    distributed.all_reduce_sum(flags)
    return bool(flags[0] > 0), bool(flags[1] > 0)


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
