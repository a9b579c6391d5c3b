"""Each client's mean-loss gradient of its state, for many clients in one batched pass.

This is the one place where the backbone runs backward. Rows of all clients in flight are mixed
in one batch; every rank takes its share of each forward; the per-client denominators (label
tokens) are computed from the whole batch on every rank, so the sum over ranks of the local
gradients is the exact gradient; one all_reduce per call sums them (DESIGN.md 2-4).

A client's gradient does not depend on which other clients share its step (K) or on the number
of ranks, bit for bit where the rows take eager attention (tests/test_exactness.py):

- its rows are cut into *units* by its own rows alone (longest first, as many as one rank's
  forward holds): a unit is what is summed in the model's dtype, and that cut is the same
  whatever else is in flight;
- each unit reads its own copy of its client's state (an `index_select` of a float64 copy of
  the bank), so units of one client in one forward are summed apart, and the units' gradients
  meet in float64, whose sums of a few float32 values are exact in any order;
- a row's numbers do not depend on how far its forward pads it: eager attention's masked keys
  add exact zeros (SDPA's CPU kernel does not: up to 1e-5 apart between paddings of 33 and 40),
  which is why CPU training takes eager up to `eager_keys` (`backbone.attention_implementation`);
  a forward never mixes units on both sides of that limit.

Units are packed into forwards longest first, so a forward pads its rows to a length they nearly
share: mixing clients with different text lengths costs little padding. A forward is bounded by
a token budget per rank as well as by rows: on a CPU, activations that outgrow the caches make
the elementwise kernels memory-bound (measured in docs/BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Sequence

import torch

from profit_ds import distributed
from profit_ds.adapters.base import Adapter
from profit_ds.adapters.prompt import PROMPT
from profit_ds.fl.state import State, num_rows
from profit_ds.memory import ForwardLimit
from profit_ds.model.backbone import Backbone
from profit_ds.model.prompted import Encoded, collate

Row = tuple[int, Encoded]
Unit = list[Row]  # rows of one client, always in one forward, summed together


def _length(row: Row) -> int:
    return len(row[1].source) + len(row[1].target)


def _pack(items: Sequence[Unit], num_prompt: int, max_rows: int, limit: ForwardLimit
          ) -> list[list[Unit]]:
    """Greedy, in order: each pack takes items while its rows (padded to its first item's
    longest row, the pack's longest) fit `max_rows` and `limit`, and take the same attention
    kernel as its first."""
    packs: list[list[Unit]] = []
    rows = labels = 0
    for item in items:
        n, with_item = rows + len(item), labels + sum(len(e.target) for _, e in item)
        if packs:
            longest = _length(packs[-1][0][0])
            if (n <= max_rows and limit.fits(n, longest, num_prompt, with_item)
                    and limit.costs.same_kernel(num_prompt + longest,
                                                num_prompt + _length(item[0]))):
                packs[-1].append(item)
                rows, labels = n, with_item
                continue
        packs.append([item])
        rows, labels = len(item), sum(len(e.target) for _, e in item)
    return packs


def client_units(rows: Sequence[Row], num_prompt: int, max_rows: int, limit: ForwardLimit
                 ) -> list[Unit]:
    """Each client's rows, longest first, cut into units that fit one rank's forward alone:
    a function of the client's own rows, never of its batch mates or the ranks."""
    by_client: dict[int, list[Row]] = {}
    for row in rows:
        by_client.setdefault(row[0], []).append(row)
    units: list[Unit] = []
    for client in sorted(by_client):
        mine = sorted(by_client[client], key=lambda r: -_length(r))
        units += [[r for unit in pack for r in unit]
                  for pack in _pack([[r] for r in mine], num_prompt, max_rows, limit)]
    return units


def forward_chunks(rows: Sequence[Row], num_prompt: int, max_rows: int, limit: ForwardLimit
                   ) -> list[list[Unit]]:
    """One rank's forwards: the units, longest first (ties in client order), packed into
    forwards of at most `max_rows` rows that fit `limit` (its bytes and padded tokens)."""
    units = client_units(rows, num_prompt, max_rows, limit)
    units.sort(key=lambda u: -_length(u[0]))  # stable: ties keep client order
    return _pack(units, num_prompt, max_rows, limit)


def mean_loss_gradients(backbone: Backbone, bank: State, rows: Sequence[Row],
                        rows_per_forward: int, adapter: Adapter = PROMPT
                        ) -> tuple[State, torch.Tensor]:
    """Gradients (a state like `bank`) of each client's mean token loss, and those mean
    losses `[K]`.

    `rows` pairs a bank index with an encoded example; a client with no rows gets zeros.
    `rows_per_forward` bounds the rows of one rank's forward (memory), without changing the
    result; nor does the per-rank token budget, unless it cuts a client's rows differently.
    """
    k = num_rows(bank)
    extra = adapter.extra_tokens(bank)
    pad = backbone.tokenizer.pad_token_id
    world, rank = distributed.world(), distributed.rank()
    counts = _label_counts(rows, k)
    denom = counts.clamp(min=1).to(torch.float32)
    leaf = {n: t.detach().to(torch.float64).requires_grad_(adapter.trains(n))
            for n, t in bank.items()}
    loss_sums = torch.zeros(k, dtype=torch.float64)
    batches = forward_chunks(rows, extra, max(rows_per_forward, 1), backbone.forward_limit())
    for start in range(0, len(batches), world):  # one forward: a batch per rank
        mine = batches[start + rank] if start + rank < len(batches) else None
        _start_zero3_step(backbone)
        if mine:
            owners = torch.tensor([unit[0][0] for unit in mine])
            batch = collate([e for unit in mine for _, e in unit],
                            [u for u, unit in enumerate(mine) for _ in unit], pad)
            copies = {n: t.index_select(0, owners) for n, t in leaf.items()}
            sums = _forward_backward(backbone, adapter, copies, batch,
                                     denom.index_select(0, owners))
            loss_sums.index_add_(0, owners, sums.detach().double().cpu())
        else:  # keep ZeRO-3's collective all-gathers in lock-step with the other ranks
            eos = backbone.tokenizer.eos_token_id
            idle = collate([Encoded((eos,), (eos,))], [0], pad)  # a 1-token row, weight 0
            _forward_backward(backbone, adapter, {n: t[:1] for n, t in leaf.items()}, idle,
                              None)
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


def _forward_backward(backbone: Backbone, adapter: Adapter, bank: State, batch,
                      denom: torch.Tensor | None) -> torch.Tensor:
    """Backward of sum_k (client k's loss sum) / denom[k] (times 0 where `denom` is None: an
    idle rank's dummy row); returns the sums. The backward runs under the same attention
    kernel (activation checkpointing recomputes with it) and the same adapter rows (it
    recomputes their low-rank terms too)."""
    model = backbone.model
    with backbone.training_attention(adapter.extra_tokens(bank) + batch.input_ids.shape[1]), \
            adapter.rows(model, bank, batch.row_client):
        sums = adapter.loss_sums(model, bank, batch, backbone.checkpointing)
        if denom is None:
            (sums.sum() * 0.0).backward()
        else:
            (sums / denom.to(sums.device)).sum().backward()
    return sums
