"""`profit-ds personalize RUN_DIR`: the personalization study on a finished run.

Why a separate command: the study (lr x epochs x prox lambda x interpolation, with model
selection on validation clients) costs many times the run's own personalization and is
repeated with different grids, so it reuses a finished run's prompt instead of training again.
"""
from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from profit_ds.cli import app
from profit_ds.errors import UsageError
from profit_ds.selection import SETTING, StudyGrid


def floats(text: str, flag: str) -> tuple[float, ...]:
    """'0,0.1,1' -> (0.0, 0.1, 1.0); a bad entry is a one-line error naming the flag."""
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"{flag} {text}: expected comma-separated numbers") from None


def points_table(study: dict) -> Table:
    """Every setting's mean scores, test clients next to the split the selection used."""
    splits = list(study["federated"])
    table = Table(title="Personalization study: mean ROUGE-L, local / global "
                        f"({' | '.join(splits)} clients)")
    for col in (*SETTING, *splits):
        table.add_column(col.replace("_", " "), justify="right")
    by_key = {(p["split"],) + tuple(p[k] for k in SETTING): p for p in study["points"]}
    for p in (p for p in study["points"] if p["split"] == "test"):
        key = tuple(p[k] for k in SETTING)
        cells = [by_key[(s,) + key] for s in splits]
        table.add_row(*(f"{v:g}" for v in key),
                      *(f"{c['local_rouge_l']:.2f} / {c['global_rouge_l']:.2f}" for c in cells))
    table.caption = "federated prompt: " + " | ".join(
        f"{s} {f['local_rouge_l']:.2f} / {f['global_rouge_l']:.2f}"
        for s, f in study["federated"].items())
    return table


def selection_table(study: dict) -> Table:
    sel = study["selected"]
    table = Table(title="Selected setting", caption=sel["rule"])
    for col in ("setting", "chosen on local / global", "test local / global"):
        table.add_column(col)
    setting = sel["setting"]
    label = ", ".join(f"{k}={v:g}" for k, v in setting.items()) if setting else "federated prompt"
    table.add_row(label, f"{sel['chosen_on']['local_rouge_l']:.2f} / "
                         f"{sel['chosen_on']['global_rouge_l']:.2f}",
                  f"{sel['test']['local_rouge_l']:.2f} / {sel['test']['global_rouge_l']:.2f}")
    return table


@app.command()
def personalize(
    run_dir: Path = typer.Argument(..., help="A finished run's --output-dir."),
    lrs: str = typer.Option("1,30,300", help="Personalization learning rates, comma-separated."),
    epochs: int = typer.Option(3, help="Personalization epochs (every epoch is scored)."),
    opt: str = typer.Option("sgd", help="sgd | adam"),
    prox_lambdas: str = typer.Option("0", help="Proximal weights lambda (lambda/2 ||p - p_global||^2)."),
    interp_alphas: str = typer.Option("", help="Interpolation weights a: a*p_local + (1-a)*p_global."),
    select_on: str = typer.Option("validation", help="validation (the paper's) | test (oracle, optimistic)."),
    tolerance: float = typer.Option(1.0, help="Global ROUGE-L points the chosen setting may lose vs. the federated prompt."),
) -> None:
    """Personalize every test (and validation) client over the grid, select the setting on the
    validation clients, write RUN_DIR/study.json and print the tables."""
    from profit_ds.report import Reporter
    from profit_ds.study import study_run

    grid = StudyGrid(floats(lrs, "--lrs"), epochs, opt, floats(prox_lambdas, "--prox-lambdas"),
                     floats(interp_alphas, "--interp-alphas"), select_on, tolerance)
    study = study_run(run_dir, grid, Reporter())
    console = Console()
    console.print(points_table(study))
    console.print(selection_table(study))
    console.print(f"wrote {run_dir / 'study.json'}")
