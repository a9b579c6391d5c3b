"""Each client's mean-loss gradient of its prompt, for many clients in one batched pass.

This is the one place where the backbone runs backward. Rows of all clients in flight are mixed
in one batch; every rank takes its slice of each forward chunk; the per-client denominators
(label tokens) are computed from the whole batch on every rank, so the sum over ranks of the
local gradients is the exact gradient; one all_reduce per call sums them (DESIGN.md 2-4).

Rows are sorted by length before they are cut into forward chunks, so a chunk pads its rows to
a length they nearly share: mixing clients with different text lengths costs no padding. A
chunk is bounded by a token budget per rank (`distributed.TOKENS_PER_FORWARD`) as well as by
rows, which bounds activation memory whatever K is.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from profit_ds import distributed
from profit_ds.model.backbone import Backbone
from profit_ds.model.prompted import Encoded, client_loss_sums, collate

Row = tuple[int, Encoded]


def _length(e: Encoded) -> int:
    return len(e.source) + len(e.target)


def forward_chunks(rows: Sequence[Row], max_rows: int, max_tokens: int) -> list[list[Row]]:
    """Rows longest first, cut into the fewest chunks of at most `max_rows` rows and
    `max_tokens` tokens (both over all ranks), of about equal size, so that no small chunk is
    left over to pay a forward (and, under ZeRO-3, an all-gather) for little work. Tokens are
    the rows' own: sorted rows pad little, and each client's prompt is computed once."""
    order = sorted(rows, key=lambda r: -_length(r[1]))
    left = sum(_length(e) for _, e in order)
    chunks: list[list[Row]] = []
    tokens, target = 0, 0.0
    for i, row in enumerate(order):
        n = _length(row[1])
        if (not chunks or tokens >= target or len(chunks[-1]) >= max_rows
                or tokens + n > max_tokens):
            # an equal share of what is left, over the fewest chunks that can hold it
            target = left / max(1, math.ceil(left / max_tokens),
                                math.ceil((len(order) - i) / max_rows))
            chunks.append([])
            tokens = 0
        chunks[-1].append(row)
        tokens += n
        left -= n
    return chunks


def mean_loss_gradients(backbone: Backbone, bank: torch.Tensor, rows: Sequence[Row],
                        rows_per_forward: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients `[K, P, D]` of each client's mean token loss, and those mean losses `[K]`.

    `rows` pairs a bank index with an encoded example; a client with no rows gets zeros.
    `rows_per_forward` bounds the rows of one forward on all ranks together (memory), without
    changing the result beyond float rounding; so does the per-rank token budget.
    """
    k = bank.shape[0]
    pad = backbone.tokenizer.pad_token_id
    world = distributed.world()
    counts = _label_counts(rows, k)
    denom = counts.clamp(min=1).to(torch.float32)
    leaf = bank.detach().clone().requires_grad_(True)
    loss_sums = torch.zeros(k, dtype=torch.float64)
    for part in forward_chunks(rows, max(rows_per_forward, world),
                               distributed.tokens_per_forward() * world):
        mine = part[distributed.my_slice(len(part))]
        if mine:
            batch = collate([e for _, e in mine], [c for c, _ in mine], pad)
            sums = client_loss_sums(backbone.model, leaf, batch)
            (sums / denom).sum().backward()
            loss_sums += sums.detach().double()
        else:  # keep ZeRO-3's collective all-gathers in lock-step with the other ranks
            _idle_forward_backward(backbone, leaf)
    grads = leaf.grad if leaf.grad is not None else torch.zeros_like(bank)
    distributed.all_reduce_sum(grads, loss_sums)
    return grads.to(bank.dtype), (loss_sums / counts.clamp(min=1)).to(torch.float32)


def _label_counts(rows: Sequence[Row], num_clients: int) -> torch.Tensor:
    """Label tokens per client over all rows (every target token is a label): the
    denominators of the clients' mean losses, known before any forward."""
    clients = torch.tensor([c for c, _ in rows], dtype=torch.long)
    sizes = torch.tensor([len(e.target) for _, e in rows], dtype=torch.float64)
    return torch.zeros(num_clients, dtype=torch.float64).index_add_(0, clients, sizes)


def _idle_forward_backward(backbone: Backbone, leaf: torch.Tensor) -> None:
    """A rank with no rows in a chunk still joins the parameter all-gathers, with a 1-token row
    whose loss is multiplied by zero."""
    eos = backbone.tokenizer.eos_token_id
    batch = collate([Encoded((eos,), (eos,))], [0], backbone.tokenizer.pad_token_id)
    (client_loss_sums(backbone.model, leaf, batch).sum() * 0.0).backward()
