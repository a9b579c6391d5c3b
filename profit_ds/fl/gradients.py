"""Each client's mean-loss gradient of its prompt, for many clients in one batched pass.

This is the one place where the backbone runs backward. Rows of all clients in flight are mixed
in one batch; every rank takes its slice of each forward chunk; the per-client denominators
(label tokens) are computed from the whole batch on every rank, so the sum over ranks of the
local gradients is the exact gradient; one all_reduce per call sums them (DESIGN.md 2-4).
"""
from __future__ import annotations

from typing import Sequence

import torch

from profit_ds import distributed
from profit_ds.model.backbone import Backbone
from profit_ds.model.prompted import Encoded, client_loss_sums, collate, label_counts


def mean_loss_gradients(backbone: Backbone, bank: torch.Tensor,
                        rows: Sequence[tuple[int, Encoded]], rows_per_forward: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients `[K, P, D]` of each client's mean token loss, and those mean losses `[K]`.

    `rows` pairs a bank index with an encoded example; a client with no rows gets zeros.
    `rows_per_forward` bounds the rows of one forward on all ranks together (memory), without
    changing the result beyond float rounding.
    """
    k = bank.shape[0]
    pad = backbone.tokenizer.pad_token_id
    whole = collate([e for _, e in rows], [c for c, _ in rows], pad)
    counts = label_counts(whole, k)
    denom = counts.clamp(min=1).to(torch.float32)
    leaf = bank.detach().clone().requires_grad_(True)
    loss_sums = torch.zeros(k, dtype=torch.float64)
    chunk = max(rows_per_forward, distributed.world())
    for start in range(0, len(rows), chunk):
        part = rows[start: start + chunk]
        mine = [part[i] for i in range(len(part))[distributed.my_slice(len(part))]]
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


def _idle_forward_backward(backbone: Backbone, leaf: torch.Tensor) -> None:
    """A rank with no rows in a chunk still joins the parameter all-gathers, with a 1-token row
    whose loss is multiplied by zero."""
    eos = backbone.tokenizer.eos_token_id
    batch = collate([Encoded((eos,), (eos,))], [0], backbone.tokenizer.pad_token_id)
    (client_loss_sums(backbone.model, leaf, batch).sum() * 0.0).backward()
