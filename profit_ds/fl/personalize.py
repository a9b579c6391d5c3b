"""Personalization: every test client fine-tunes the global state on its local train data.

For each learning rate of the grid and for `epochs` epochs; after every epoch the client's state
is scored on its own local test set (personalization) and on the global test set (robustness),
Profit's trade-off. All (client, lr) pairs are independent, so they run as one bank (`fl/state.py`),
`k_parallel` at a time, through the same local-training loop as the federated clients
(`fl/local.py`), and their evaluations share generation batches.

Two optional ways to hold a client near the federated prompt (Profit's regularizers):
`prox_lambdas` adds the proximal gradient lambda * (p - p_global) to every step
(lambda/2 ||p - p_global||^2, `fl/proximal.py`), and `alphas` scores the interpolated states
a * p_local + (1 - a) * p_global after every epoch, in the same generation batches. The lr and
lambda are per-row values, so a whole (client, lr, lambda) grid runs as one bank. With the
defaults (lambda 0, no alphas) the computation is exactly plain personalization.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from profit_ds.adapters.base import Adapter
from profit_ds.adapters.prompt import PROMPT
from profit_ds.fl.clients import ClientData, EvalSet, local_batches
from profit_ds.fl.divergence import Diverged
from profit_ds.fl.local import run_local_steps
from profit_ds.fl.optim import ClientOptimizer, init_client_state
from profit_ds.fl.proximal import proximal
from profit_ds.fl.rounds import chunks
from profit_ds.fl.state import State, add, cat, expand, finite_rows, row, scale, take, where
from profit_ds.model.backbone import Backbone

# (bank, requests, tags) -> one score dict per request; tags[i] says what request i is
# (client, lr, epoch, set, alpha), for the predictions files
Evaluator = Callable[[State, Sequence[tuple[int, EvalSet]], Sequence[dict]], list[dict]]


@dataclass(frozen=True)
class PersonalizeSpec:
    opt: ClientOptimizer
    lrs: Sequence[float]
    epochs: int
    batch_size: int
    seed: int
    prox_lambdas: Sequence[float] = (0.0,)
    alphas: Sequence[float] = ()
    adapter: Adapter = PROMPT


Setting = tuple[float, float]  # (lr, prox_lambda)
Prompts = dict[str, dict[Setting, State]]  # client name -> setting -> final state


def personalize(backbone: Backbone, model: State, clients: Sequence[ClientData],
                global_test: EvalSet, spec: PersonalizeSpec, k_parallel: int,
                evaluate: Evaluator, done: tuple[list[dict], Prompts] | None = None,
                on_group_done: Callable[[list[dict], Prompts], None] | None = None,
                on_trained: Callable[[int], None] | None = None
                ) -> tuple[list[dict], Prompts]:
    """Per-(client, lr, lambda, epoch) scores, and each client's final state per (lr, lambda).

    `done` holds the records and prompts of (client, setting) pairs finished before an
    interruption; they are skipped. `on_group_done` sees everything finished so far after each
    group (for checkpoints); `on_trained(n)` after each local step of the group's n examples
    (progress: on a real model, training is most of personalization's time). Each pair's
    result depends only on itself, not on its group.
    """
    records: list[dict] = list(done[0]) if done else []
    prompts: Prompts = {c.name: dict(done[1].get(c.name, {})) if done else {} for c in clients}
    pairs = [(c, (lr, lam)) for c in clients for lr in spec.lrs for lam in spec.prox_lambdas
             if (lr, lam) not in prompts[c.name]]
    for group in chunks(pairs, k_parallel):
        bank = expand(model, len(group))
        state = init_client_state(spec.opt, bank)
        lams = torch.tensor([lam for _, (_, lam) in group], dtype=torch.float32)
        penalty = proximal(model, lams) if lams.any() else None
        lr = torch.tensor([lr for _, (lr, _) in group], dtype=torch.float32)
        alive = [True] * len(group)
        for epoch in range(1, spec.epochs + 1):
            # a client's batch order depends on its lr, not on lambda: lambdas compare alike
            schedules = [[[c.train[i] for i in batch] for batch in local_batches(
                c.num_examples, 1, spec.batch_size,
                f"{spec.seed}/personalize/{c.name}/lr{lr_}/epoch{epoch}")] if alive[k] else []
                for k, (c, (lr_, _)) in enumerate(group)]
            before = bank
            bank, losses = run_local_steps(backbone, bank, spec.opt, state, lr, schedules,
                                           after_step=_counting(schedules, on_trained),
                                           extra_grad=penalty, adapter=spec.adapter)
            ok = finite_rows(bank) & torch.isfinite(losses)
            for k, (c, setting) in enumerate(group):
                if alive[k] and not ok[k]:  # it stops here, keeping its last finite prompt
                    alive[k] = False
                    why = Diverged("personalization", "non-finite loss or prompt",
                                   client=c.name, setting=_describe(setting, epoch))
                    records.append({**_key(c, setting, epoch), "diverged": why.record()})
            bank = where(ok, bank, before)
            live = [k for k in range(len(group)) if alive[k]]
            if not live:
                continue
            scores = _score(evaluate, take(bank, live), model,
                            [group[k] for k in live], global_test, spec.alphas, epoch)
            for j, k in enumerate(live):
                records.append({**_key(*group[k], epoch), "train_loss": float(losses[k]),
                                **scores[j]})
        for k, (c, setting) in enumerate(group):
            prompts[c.name][setting] = row(bank, k)
        if on_group_done:
            on_group_done(records, prompts)
    return records, prompts


def scored_rows(clients: Sequence[ClientData], global_test: EvalSet,
                spec: PersonalizeSpec) -> float:
    """Rows one pair's scoring generates after each epoch, on average: its client's local
    test set and the global one, for its prompt and each interpolation alpha (`_score`)."""
    local = sum(len(c.test) for c in clients) / max(1, len(clients))
    return (local + len(global_test)) * (1 + len(spec.alphas))


def _counting(schedules: Sequence[Sequence[Sequence]], on_trained: Callable[[int], None] | None
              ) -> Callable[[], None] | None:
    """An `after_step` for `run_local_steps` that tells `on_trained` each step's examples."""
    if on_trained is None:
        return None
    step = iter(range(max((len(s) for s in schedules), default=0)))

    def stepped() -> None:
        t = next(step)
        on_trained(sum(len(s[t]) for s in schedules if t < len(s)))
    return stepped


def _key(client: ClientData, setting: Setting, epoch: int) -> dict:
    """What identifies a record (and a predictions line): client, lr, lambda, epoch."""
    lr, lam = setting
    return {"client": client.name, "lr": lr, "prox_lambda": lam, "epoch": epoch}


def _describe(setting: Setting, epoch: int) -> str:
    lr, lam = setting
    return f"lr {lr:g}" + (f", lambda {lam:g}" if lam else "") + f", epoch {epoch}"


def _score(evaluate: Evaluator, bank: State, model: State,
           pairs: Sequence[tuple[ClientData, Setting]], global_test: EvalSet,
           alphas: Sequence[float], epoch: int) -> list[dict]:
    """Each pair's scores after `epoch` (bank row k is pairs[k]'s state): on its local test
    set and the global one, and with `alphas` its interpolations, all in shared batches."""
    scored = interpolate(bank, model, alphas)
    owners = list(pairs) * (1 + len(alphas))
    requests = [(r, c.test) for r, (c, _) in enumerate(owners)]
    requests += [(r, global_test) for r in range(len(owners))]
    tags = [{**_key(c, setting, epoch), "set": which,
             **({"alpha": ([1.0] + list(alphas))[r // len(pairs)]} if alphas else {})}
            for which in ("local", "global") for r, (c, setting) in enumerate(owners)]
    scores = evaluate(scored, requests, tags)
    out = []
    for k in range(len(pairs)):
        row = _row_scores(scores, len(owners), k)
        if alphas:
            row["interpolated"] = [
                {"alpha": a, **_row_scores(scores, len(owners), (j + 1) * len(pairs) + k)}
                for j, a in enumerate(alphas)]
        out.append(row)
    return out


def interpolate(bank: State, model: State, alphas: Sequence[float]) -> State:
    """`bank` followed by a * bank + (1 - a) * model for each a: one bank, so the
    interpolated states are scored in the same generation batches as the local ones.
    a = 0 gives `model` and a = 1 gives `bank` exactly (x * 1 + p * 0 == x in floats)."""
    if not alphas:
        return bank
    return cat([bank] + [add(scale(bank, a), model, 1 - a) for a in alphas])


def _row_scores(scores: Sequence[dict], rows: int, r: int) -> dict:
    """Bank row r's scores, given requests ordered [every row's local set, every row's global]."""
    local, glob = scores[r], scores[rows + r]
    return {"local_rouge_l": local["rouge_l"], "local_exact_match": local["exact_match"],
            "global_rouge_l": glob["rouge_l"], "global_exact_match": glob["exact_match"]}


def summarize(records: Sequence[dict]) -> list[dict]:
    """Mean over clients for each (lr, epoch): the contract's `personalized` entries (a run
    personalizes at lambda 0; the study groups its grid itself). A pair that diverged is left
    out from its epoch on (results.json lists it under `diverged`)."""
    scored = [r for r in records if "diverged" not in r]
    keys = sorted({(r["lr"], r["epoch"]) for r in scored})
    out = []
    for lr, epoch in keys:
        rows = [r for r in scored if r["lr"] == lr and r["epoch"] == epoch]
        out.append({"lr": lr, "epoch": epoch, "clients": len(rows),
                    **{m: sum(r[m] for r in rows) / len(rows)
                       for m in ("local_rouge_l", "global_rouge_l", "local_exact_match",
                                 "global_exact_match", "train_loss")}})
    return out
