"""Running the frozen backbone with per-row soft prompts (DESIGN.md points 2-3).

A batch mixes rows of several clients. Row `r` reads the prompt `prompts[row_client[r]]`
(a gather from the `[K, P, D]` prompt bank), prepended to its token embeddings. The loss is the
sum over clients of each client's mean token loss, so the gradient that reaches `prompts[k]` is
exactly client k's own mean-loss gradient, whatever else shares the batch.

LM-head logits are computed only at positions that predict a label token: with long sources
and short outputs (SNI), that is a small fraction of positions, and for a 32k-vocabulary
backbone the full logits tensor would dominate memory.

Every gather on the gradient path is an `index_select`, never advanced indexing
(`x[idx]`, `x[mask]`): on CPU the backward of advanced indexing adds rows that share an index
with parallel float atomics, whose order varies from run to run, while index_select's backward
adds them serially. Measured before this rule: about 1 step in 50 differed in the last bits,
and a federated run's chaotic trajectory turned that into scores several points apart between
two runs of the same seed. `tests/test_exactness.py` checks the autograd graph for it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from profit_ds.data.format import TruncationReport, truncate_source, truncate_target
from profit_ds.data.types import Example
from profit_ds.model.kv_cache import ReservedLayer

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    """Token ids of one example: the source (ending in the output cue) and the target + EOS."""

    source: tuple[int, ...]
    target: tuple[int, ...]


def encode(tokenizer, examples: Sequence[Example], max_source_tokens: int | None = None,
           max_target_tokens: int | None = None,
           report: TruncationReport | None = None, chat: bool = False) -> list[Encoded]:
    """Tokenize sources and targets separately, so the loss mask is exact.

    Over-long sources lose their middle (the Definition at the head and the instance input with
    the output cue at the tail matter most); targets are cut from the right; EOS is always kept
    so the model learns to stop. `report` counts what was cut.

    `chat`: the source is the user's turn of the tokenizer's chat template, ending in the
    assistant's turn header (`chat_source`), and the target is the assistant's reply (no
    leading space), ended by EOS (for instruct models the end-of-turn token, e.g. SmolLM2's
    `<|im_end|>`). Otherwise the target follows the source's "Output:" cue after a space.
    """
    texts = [chat_source(tokenizer, e.source) if chat else e.source for e in examples]
    sources = tokenizer(texts, add_special_tokens=False)["input_ids"]
    lead = "" if chat else " "
    targets = tokenizer([lead + e.target for e in examples], add_special_tokens=False)["input_ids"]
    keep_tail = (max_source_tokens or 0) // 2
    out = []
    for s, t in zip(sources, targets):
        s_cut = truncate_source(s, max_source_tokens, keep_tail)
        t_cut = truncate_target(t, max_target_tokens)
        if report is not None:
            report.record(len(s_cut) < len(s), len(t_cut) < len(t))
        out.append(Encoded(tuple(s_cut), tuple(t_cut) + (tokenizer.eos_token_id,)))
    return out


def chat_source(tokenizer, text: str) -> str:
    """`text` as the user's message in the tokenizer's chat template, followed by the header
    of the assistant's reply (what an instruct model was trained to answer after)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


@dataclass
class TrainBatch:
    """Right-padded source+target rows; labels are IGNORE except on target tokens."""

    input_ids: torch.Tensor   # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor      # [B, L]
    row_client: torch.Tensor  # [B] index into the prompt bank

    def rows(self, sl: slice) -> "TrainBatch":
        return TrainBatch(self.input_ids[sl], self.attention_mask[sl], self.labels[sl],
                          self.row_client[sl])

    def to(self, device: torch.device) -> "TrainBatch":
        return TrainBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.labels.to(device), self.row_client.to(device))


def model_device(model) -> torch.device:
    """Where `model` computes: its input embedding's device. Under ZeRO-3 a partitioned
    parameter keeps an empty placeholder on the compute device, so this holds there too."""
    return model.get_input_embeddings().weight.device


def collate(encoded: Sequence[Encoded], row_client: Sequence[int], pad_id: int) -> TrainBatch:
    length = max(len(e.source) + len(e.target) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE, dtype=torch.long)
    for r, e in enumerate(encoded):
        row = e.source + e.target
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        labels[r, len(e.source): len(row)] = torch.tensor(e.target)
    return TrainBatch(ids, mask, labels, torch.tensor(list(row_client), dtype=torch.long))


def select_cache_rows(cache, rows: torch.Tensor) -> None:
    """Keep (and repeat) the KV cache entries `rows`, in place: one entry per client expanded
    to one per row, or a batch's finished rows dropped; with index_select (not
    `cache.batch_select_indices`, which indexes: the determinism rule above); a reserved
    layer keeps its room for the positions still to come (`model/kv_cache.py`)."""
    for layer in cache.layers:
        if isinstance(layer, ReservedLayer):
            layer.select_rows(rows)
        else:
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)


@contextmanager
def checkpointed(model) -> Iterator[None]:
    """transformers' activation checkpointing for one forward: its decoder layers checkpoint
    only in training mode, which changes nothing else in a Llama-style decoder without
    dropout. Reentrant: the recompute calls each layer through its module hooks, where ZeRO-3
    gathers the layer's parameters again (non-reentrant recomputation meets the released
    placeholders and fails)."""
    if not getattr(model, "_profit_ds_checkpointing", False):
        kwargs = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # its name before transformers 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model._profit_ds_checkpointing = True
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


GEMM_MIN_ROWS = 16


def _at_least_rows(linear, x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` computed with at least GEMM_MIN_ROWS rows (zero rows appended, their
    outputs dropped): below that the CPU BLAS takes other kernels whose rounding differs
    (measured: fp32 `linear` at 1, 2 and 4 rows gave other bits than the same rows among
    600), so a client's few label positions would round differently alone than among
    other clients'."""
    short = GEMM_MIN_ROWS - x.shape[0]
    if short <= 0:
        return linear(x)
    return linear(torch.cat([x, x.new_zeros(short, x.shape[1])]))[: x.shape[0]]


def client_loss_sums(model, prompts: torch.Tensor, batch: TrainBatch,
                     checkpointing: bool = False) -> torch.Tensor:
    """Per-client sums of token cross-entropy over label tokens, shape `[K]` (float32).

    The same numbers as running every row as `[its client's prompt ; its tokens]`, with a
    client's prompt computed once instead of once per row: prompt positions come first and
    attend only to each other, so their keys and values at every layer are the same for all
    of a client's rows. A first pass runs each client's prompt alone and keeps its KV cache;
    the rows then run their tokens only, attending to their client's cached prompt. With B
    rows per client that skips (B-1)/B of the prompt positions' work (a fifth of a step on the
    built-in suite). Then the LM head runs only at positions whose next token is a label.

    `checkpointing` (activation checkpointing, for backbones whose activations do not fit):
    each decoder layer keeps only its input and recomputes the rest in the backward pass.
    A layer recomputed while it appends to a KV cache would append twice, so this path runs
    every row as the plain sequence `[its prompt ; its tokens]` instead of sharing the
    prompt's cache; the sums are the same up to float rounding (tested).

    Batch and prompts may live on the CPU (the optimizers' side); they are moved to the
    model's device here, and the gradient flows back to `prompts` wherever it lives. The sums
    stay on the model's device.
    """
    device = model_device(model)
    batch = batch.to(device)
    prompts = prompts.to(device)
    body = model.base_model
    embeds = model.get_input_embeddings()(batch.input_ids)
    mask = torch.cat([batch.attention_mask.new_ones(len(batch.row_client), prompts.shape[1]),
                      batch.attention_mask], dim=1)
    if checkpointing:
        rows = torch.cat([prompts.index_select(0, batch.row_client).to(embeds.dtype), embeds], 1)
        with checkpointed(model):
            hidden = body(inputs_embeds=rows, attention_mask=mask,
                          use_cache=False).last_hidden_state[:, prompts.shape[1]:]
    else:
        clients, slot = torch.unique(batch.row_client, return_inverse=True)
        cache = body(inputs_embeds=prompts.index_select(0, clients).to(embeds.dtype),
                     use_cache=True).cache
        select_cache_rows(cache, slot)
        hidden = body(inputs_embeds=embeds, attention_mask=mask, cache=cache).last_hidden_state
    return label_loss_sums(model, hidden, batch, prompts.shape[0])


def label_loss_sums(model, hidden: torch.Tensor, batch: TrainBatch, num_clients: int
                    ) -> torch.Tensor:
    """`[num_clients]` sums of token cross-entropy over label tokens, from the last hidden
    states `[B, L, D]` of `batch`'s tokens (on the model's device), with the LM head run only
    at positions whose next token is a label."""
    # position t predicts token t+1
    targets = batch.labels[:, 1:]
    where = (targets != IGNORE).flatten().nonzero().squeeze(1)
    predicting = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, where)
    logits = _at_least_rows(model.get_output_embeddings(), predicting).float()
    token_loss = F.cross_entropy(logits, targets.flatten()[where], reduction="none")
    client_of_token = batch.row_client[where // targets.shape[1]]
    return torch.zeros(num_clients, dtype=token_loss.dtype,
                       device=token_loss.device).index_add(0, client_of_token, token_loss)
