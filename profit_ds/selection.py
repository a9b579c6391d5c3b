"""The personalization study's grid, its points and the rule that selects a setting.

Pure functions over records (no model, no torch), shared by the study (`profit_ds.study`),
its tables (`profit-ds personalize`) and the plots (`profit_ds.plots`), which must not pay
for loading a model to read one constant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from profit_ds.errors import UsageError

SETTING = ("lr", "prox_lambda", "epoch", "alpha")
METRICS = ("local_rouge_l", "global_rouge_l", "local_exact_match", "global_exact_match")
SELECT_ON = ("validation", "test")
RULE = ("Among the settings (lr, prox_lambda, epoch, alpha) whose mean global ROUGE-L on the "
        "{split} clients' global set is at least the federated prompt's minus {tol:g} points, "
        "take the one with the highest mean local ROUGE-L on those clients (ties: the first in "
        "(lr, prox_lambda, epoch, alpha) order); if none qualifies, keep the federated prompt. "
        "Report the test clients' scores at that setting.")


@dataclass(frozen=True)
class StudyGrid:
    """What `profit-ds personalize` sweeps; alpha 1 (the personalized prompt) is always scored."""

    lrs: tuple[float, ...]
    epochs: int
    opt: str = "sgd"
    prox_lambdas: tuple[float, ...] = (0.0,)
    alphas: tuple[float, ...] = ()
    select_on: str = "validation"
    tolerance: float = 1.0

    def __post_init__(self) -> None:
        """Refuse an impossible grid before a backbone is loaded."""
        from profit_ds.fl.optim import CLIENT_OPTIMIZERS

        if self.opt not in CLIENT_OPTIMIZERS:
            raise UsageError(f"--opt {self.opt}: expected one of {', '.join(CLIENT_OPTIMIZERS)}")
        if self.select_on not in SELECT_ON:
            raise UsageError(f"--select-on {self.select_on}: expected one of "
                             f"{', '.join(SELECT_ON)}")
        if not self.lrs or min(self.lrs) < 0:
            raise UsageError("--lrs: give one or more learning rates >= 0")
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be >= 1")
        if not self.prox_lambdas or min(self.prox_lambdas) < 0:
            raise UsageError("--prox-lambdas: give one or more lambdas >= 0")


def flatten(record: dict) -> list[dict]:
    """One row per scored prompt of a personalization record: the personalized prompt
    (alpha 1) and its interpolations (alpha 1's interpolated copy is the same prompt; it is
    kept in the raw records as the identity check, not repeated here)."""
    if "diverged" in record:  # no scores: the pair stopped at a non-finite step
        return []
    base = {k: record[k] for k in ("split", "client", "lr", "prox_lambda", "epoch")}
    rows = [{**base, "alpha": 1.0, **{m: record[m] for m in METRICS}}]
    rows += [{**base, **i} for i in record.get("interpolated", []) if i["alpha"] != 1.0]
    return rows


def mean_points(records: Sequence[dict]) -> list[dict]:
    """Mean over clients of every (split, setting): the points the selection and plots use."""
    groups: dict[tuple, list[dict]] = {}
    for row in (r for rec in records for r in flatten(rec)):
        groups.setdefault((row["split"],) + tuple(row[k] for k in SETTING), []).append(row)
    return [{"split": key[0], **dict(zip(SETTING, key[1:])), "clients": len(rows),
             **{m: sum(r[m] for r in rows) / len(rows) for m in METRICS}}
            for key, rows in sorted(groups.items())]


def select(points: Sequence[dict], federated: dict[str, dict], grid: StudyGrid) -> dict:
    """Apply RULE; returns the rule's text, the chosen setting (None: the federated prompt)
    and the scores it was chosen on and is reported with."""
    floor = federated[grid.select_on]["global_rouge_l"] - grid.tolerance
    eligible = [p for p in points
                if p["split"] == grid.select_on and p["global_rouge_l"] >= floor]
    rule = RULE.format(split=grid.select_on, tol=grid.tolerance)
    if not eligible:
        return {"rule": rule, "setting": None, "chosen_on": federated[grid.select_on],
                "test": federated["test"]}
    best = max(eligible, key=lambda p: p["local_rouge_l"])
    setting = {k: best[k] for k in SETTING}
    test = next(p for p in points
                if p["split"] == "test" and all(p[k] == v for k, v in setting.items()))
    return {"rule": rule, "setting": setting, "chosen_on": best, "test": test}
