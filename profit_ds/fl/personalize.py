"""Personalization: every test client fine-tunes the global prompt on its local train data.

For each learning rate of the grid and for `epochs` epochs; after every epoch the client's prompt
is scored on its own local test set (personalization) and on the global test set (robustness),
Profit's trade-off. All (client, lr) pairs are independent, so they run as one prompt bank,
`k_parallel` at a time, and their evaluations share generation batches.

Two optional ways to hold a client near the federated prompt (Profit's regularizers):
`prox_lambda` adds the proximal gradient lambda * (p - p_global) to every step
(lambda/2 ||p - p_global||^2), and `alphas` scores the interpolated prompts
a * p_local + (1 - a) * p_global after every epoch, in the same generation batches. With the
defaults (0, no alphas) the computation is exactly plain personalization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from profit_ds.fl.clients import ClientData, EvalSet, local_batches
from profit_ds.fl.local import run_local_steps
from profit_ds.fl.optim import ClientOptimizer, init_client_state
from profit_ds.fl.rounds import chunks
from profit_ds.model.backbone import Backbone

# (bank, requests, tags) -> one score dict per request; tags[i] says what request i is
# (client, lr, epoch, set, alpha), for the predictions files
Evaluator = Callable[[torch.Tensor, Sequence[tuple[int, EvalSet]], Sequence[dict]], list[dict]]


@dataclass(frozen=True)
class PersonalizeSpec:
    opt: ClientOptimizer
    lrs: Sequence[float]
    epochs: int
    batch_size: int
    seed: int
    prox_lambda: float = 0.0
    alphas: Sequence[float] = ()


Prompts = dict[str, dict[float, torch.Tensor]]  # client name -> lr -> final prompt


def personalize(backbone: Backbone, prompt: torch.Tensor, clients: Sequence[ClientData],
                global_test: EvalSet, spec: PersonalizeSpec, k_parallel: int,
                evaluate: Evaluator, done: tuple[list[dict], Prompts] | None = None,
                on_group_done: Callable[[list[dict], Prompts], None] | None = None
                ) -> tuple[list[dict], Prompts]:
    """Per-(client, lr, epoch) scores, and each client's final prompt per lr.

    `done` holds the records and prompts of (client, lr) pairs finished before an
    interruption; they are skipped. `on_group_done` sees everything finished so far after each
    group (for checkpoints). Each pair's result depends only on itself, not on its group.
    """
    records: list[dict] = list(done[0]) if done else []
    prompts: Prompts = {c.name: dict(done[1].get(c.name, {})) if done else {} for c in clients}
    pairs = [(c, lr) for c in clients for lr in spec.lrs if lr not in prompts[c.name]]
    for group in chunks(pairs, k_parallel):
        bank = prompt.unsqueeze(0).repeat(len(group), 1, 1)
        state = init_client_state(spec.opt, bank)
        penalty = (lambda b: spec.prox_lambda * (b - prompt)) if spec.prox_lambda else None
        lr = torch.tensor([lr for _, lr in group], dtype=torch.float32)
        for epoch in range(1, spec.epochs + 1):
            schedules = [[[c.train[i] for i in batch] for batch in local_batches(
                c.num_examples, 1, spec.batch_size,
                f"{spec.seed}/personalize/{c.name}/lr{lr_}/epoch{epoch}")] for c, lr_ in group]
            bank, losses = run_local_steps(backbone, bank, spec.opt, state, lr, schedules,
                                           grad_penalty=penalty)
            scored = interpolate(bank, prompt, spec.alphas)
            owners = list(group) * (1 + len(spec.alphas))
            requests = [(r, c.test) for r, (c, _) in enumerate(owners)]
            requests += [(r, global_test) for r in range(len(owners))]
            tags = [{"client": c.name, "lr": lr_, "epoch": epoch, "set": which,
                     **({"alpha": ([1.0] + list(spec.alphas))[r // len(group)]}
                        if spec.alphas else {})}
                    for which in ("local", "global") for r, (c, lr_) in enumerate(owners)]
            scores = evaluate(scored, requests, tags)
            for k, (c, lr_) in enumerate(group):
                record = {"client": c.name, "lr": lr_, "epoch": epoch,
                          "train_loss": float(losses[k]), **_row_scores(scores, len(owners), k)}
                if spec.alphas:
                    record["interpolated"] = [
                        {"alpha": a, **_row_scores(scores, len(owners), (j + 1) * len(group) + k)}
                        for j, a in enumerate(spec.alphas)]
                records.append(record)
        for k, (c, lr_) in enumerate(group):
            prompts[c.name][lr_] = bank[k].clone()
        if on_group_done:
            on_group_done(records, prompts)
    return records, prompts


def interpolate(bank: torch.Tensor, prompt: torch.Tensor, alphas: Sequence[float]
                ) -> torch.Tensor:
    """`bank` followed by a * bank + (1 - a) * prompt for each a: one bank, so the
    interpolated prompts are scored in the same generation batches as the local ones.
    a = 0 gives `prompt` and a = 1 gives `bank` exactly (x * 1 + p * 0 == x in floats)."""
    if not alphas:
        return bank
    return torch.cat([bank] + [a * bank + (1 - a) * prompt for a in alphas])


def _row_scores(scores: Sequence[dict], rows: int, r: int) -> dict:
    """Bank row r's scores, given requests ordered [every row's local set, every row's global]."""
    local, glob = scores[r], scores[rows + r]
    return {"local_rouge_l": local["rouge_l"], "local_exact_match": local["exact_match"],
            "global_rouge_l": glob["rouge_l"], "global_exact_match": glob["exact_match"]}


def summarize(records: Sequence[dict]) -> list[dict]:
    """Mean over clients for each (lr, epoch): the contract's `personalized` entries."""
    keys = sorted({(r["lr"], r["epoch"]) for r in records})
    out = []
    for lr, epoch in keys:
        rows = [r for r in records if r["lr"] == lr and r["epoch"] == epoch]
        out.append({"lr": lr, "epoch": epoch,
                    **{m: sum(r[m] for r in rows) / len(rows)
                       for m in ("local_rouge_l", "global_rouge_l", "local_exact_match",
                                 "global_exact_match", "train_loss")}})
    return out
