"""Each client's mean-loss gradient of its state, for many clients in one batched pass.

This is the one place where the backbone runs backward. Rows of all clients in flight are mixed
in one batch; every rank takes its share of each forward chunk (`distributed.my_share`); the
per-client denominators (label tokens) are computed from the whole batch on every rank, so the
sum over ranks of the local gradients is the exact gradient; one all_reduce per call sums them
(DESIGN.md 2-4).

Rows are sorted by length before they are cut into forward chunks, so a chunk pads its rows to
a length they nearly share: mixing clients with different text lengths costs no padding. A
chunk is bounded by a token budget per rank as well as by rows: on a CPU, activations that
outgrow the caches make the elementwise kernels memory-bound (measured in docs/BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Sequence

import torch

from profit_ds import distributed
from profit_ds.adapters import Adapter
from profit_ds.adapters.prompt import PROMPT
from profit_ds.fl.state import State, detached, num_rows
from profit_ds.memory import ForwardLimit
from profit_ds.model.backbone import Backbone
from profit_ds.model.prompted import Encoded, collate

Row = tuple[int, Encoded]


def forward_chunks(rows: Sequence[Row], num_prompt: int, max_rows: int, limit: ForwardLimit,
                   world: int = 1) -> list[list[Row]]:
    """Rows longest first, cut into chunks of at most `max_rows` rows over all ranks, each
    rank's share of which (a `world`-th) fits `limit` (its bytes and padded tokens)."""
    order = sorted(rows, key=lambda r: -(len(r[1].source) + len(r[1].target)))
    chunks: list[list[Row]] = []
    labels = 0
    for row in order:
        if chunks:
            last = chunks[-1]
            longest = len(last[0][1].source) + len(last[0][1].target)
            n, with_row = len(last) + 1, labels + len(row[1].target)
            if n <= max_rows and limit.fits(-(-n // world), longest, num_prompt,
                                           -(-with_row // world)):
                last.append(row)
                labels = with_row
                continue
        chunks.append([row])
        labels = len(row[1].target)
    return chunks


def mean_loss_gradients(backbone: Backbone, bank: State, rows: Sequence[Row],
                        rows_per_forward: int, adapter: Adapter = PROMPT
                        ) -> tuple[State, torch.Tensor]:
    """Gradients (a state like `bank`) of each client's mean token loss, and those mean
    losses `[K]`.

    `rows` pairs a bank index with an encoded example; a client with no rows gets zeros.
    `rows_per_forward` bounds the rows of one forward on all ranks together (memory), without
    changing the result beyond float rounding; so does the per-rank token budget.
    """
    k = num_rows(bank)
    extra = adapter.extra_tokens(bank)
    pad = backbone.tokenizer.pad_token_id
    world = distributed.world()
    counts = _label_counts(rows, k)
    denom = counts.clamp(min=1).to(torch.float32)
    leaf = detached(bank)
    loss_sums = torch.zeros(k, dtype=torch.float64)
    for part in forward_chunks(rows, extra, max(rows_per_forward, world),
                               backbone.forward_limit(), world):
        mine = part[distributed.my_share([len(e.source) + len(e.target) for _, e in part])]
        _start_zero3_step(backbone)
        if mine:
            batch = collate([e for _, e in mine], [c for c, _ in mine], pad)
            # the backward too: activation checkpointing recomputes with the same kernel
            with backbone.training_attention(extra + batch.input_ids.shape[1]):
                sums = adapter.loss_sums(backbone.model, leaf, batch, backbone.checkpointing)
                (sums / denom).sum().backward()
            loss_sums += sums.detach().double().cpu()
        else:  # keep ZeRO-3's collective all-gathers in lock-step with the other ranks
            _idle_forward_backward(backbone, leaf, adapter)
    grads = {n: t.grad if t.grad is not None else torch.zeros_like(t) for n, t in leaf.items()}
    distributed.all_reduce_sum(*grads.values(), loss_sums)
    return ({n: g.to(bank[n].dtype) for n, g in grads.items()},
            (loss_sums / counts.clamp(min=1)).to(torch.float32))


def _start_zero3_step(backbone: Backbone) -> None:
    """Tell ZeRO-3 that a forward+backward begins, as its hook on the top module would.

    We call the backbone's submodules (embeddings, decoder body, LM head) directly, so that
    hook never fires; without it DeepSpeed never completes its trace of the module order, and
    then it all-gathers every layer's parameters one by one, twice per step (forward and
    backward), each a sync point between ranks. With the trace it fetches them ahead in large
    coalesced buckets and keeps them from forward to backward. Parameters are still released
    after the backward.
    """
    offload = getattr(backbone.engine, "optimizer", None)
    if hasattr(offload, "get_param_coordinator"):
        offload.get_param_coordinator().reset_step()


def _label_counts(rows: Sequence[Row], num_clients: int) -> torch.Tensor:
    """Label tokens per client over all rows (every target token is a label): the
    denominators of the clients' mean losses, known before any forward."""
    clients = torch.tensor([c for c, _ in rows], dtype=torch.long)
    sizes = torch.tensor([len(e.target) for _, e in rows], dtype=torch.float64)
    return torch.zeros(num_clients, dtype=torch.float64).index_add_(0, clients, sizes)


def _idle_forward_backward(backbone: Backbone, leaf: State, adapter: Adapter) -> None:
    """A rank with no rows in a chunk still joins the parameter all-gathers, with a 1-token row
    whose loss is multiplied by zero."""
    eos = backbone.tokenizer.eos_token_id
    batch = collate([Encoded((eos,), (eos,))], [0], backbone.tokenizer.pad_token_id)
    (adapter.loss_sums(backbone.model, leaf, batch, backbone.checkpointing).sum() * 0.0
     ).backward()
