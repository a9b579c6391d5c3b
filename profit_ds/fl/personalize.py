"""Personalization: every test client fine-tunes the global prompt on its local train data.

For each learning rate of the grid and for `epochs` epochs; after every epoch the client's prompt
is scored on its own local test set (personalization) and on the global test set (robustness),
Profit's trade-off. All (client, lr) pairs are independent, so they run as one prompt bank,
`k_parallel` at a time, and their evaluations share generation batches.
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

# (bank, requests) -> one score dict per request
Evaluator = Callable[[torch.Tensor, Sequence[tuple[int, EvalSet]]], list[dict]]


@dataclass(frozen=True)
class PersonalizeSpec:
    opt: ClientOptimizer
    lrs: Sequence[float]
    epochs: int
    batch_size: int
    seed: int


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
        lr = torch.tensor([lr for _, lr in group], dtype=torch.float32)
        for epoch in range(1, spec.epochs + 1):
            schedules = [[[c.train[i] for i in batch] for batch in local_batches(
                c.num_examples, 1, spec.batch_size,
                f"{spec.seed}/personalize/{c.name}/lr{lr_}/epoch{epoch}")] for c, lr_ in group]
            bank, losses = run_local_steps(backbone, bank, spec.opt, state, lr, schedules)
            requests = [(k, c.test) for k, (c, _) in enumerate(group)]
            requests += [(k, global_test) for k in range(len(group))]
            scores = evaluate(bank, requests)
            for k, (c, lr_) in enumerate(group):
                records.append({"client": c.name, "lr": lr_, "epoch": epoch,
                                "train_loss": float(losses[k]),
                                "local_rouge_l": scores[k]["rouge_l"],
                                "local_exact_match": scores[k]["exact_match"],
                                "global_rouge_l": scores[len(group) + k]["rouge_l"],
                                "global_exact_match": scores[len(group) + k]["exact_match"]})
        for k, (c, lr_) in enumerate(group):
            prompts[c.name][lr_] = bank[k].clone()
        if on_group_done:
            on_group_done(records, prompts)
    return records, prompts


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
