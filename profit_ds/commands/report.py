"""`profit-ds report RUN_DIR...`: tables, PNG plots and a CSV of every point of finished runs.

Why: a run's results.json holds the trade-off in numbers; comparing runs and reading the
trade-off needs the curves, and further analysis needs the points in one flat file. A sweep
writes many runs below one directory, so a directory of runs stands for all of them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from profit_ds.cli import app
from profit_ds.commands.personalize import points_table, selection_table
from profit_ds.errors import UsageError
from profit_ds.report import (comparison_table, federated_table, personalization_table,
                              run_differences)


@app.command()
def report(run_dirs: list[Path] = typer.Argument(..., help="Finished runs' --output-dir, or directories with runs below them (a sweep's output)."),
           out: Optional[Path] = typer.Option(None, help="Directory for the PNGs and points.csv (default: RUN_DIR/report for one RUN_DIR)."),
           ) -> None:
    """Print each run's tables and, for several runs, one table comparing them (a warning on
    stderr when they differ in backbone or data); write trade-off, rounds, per-client (and
    study) plots, the Pareto frontier over all runs, points.csv, and for a sweep's directory
    its settings' means over seeds."""
    from profit_ds.plots import find_runs, read_run, write_report

    if out is None:
        if len(run_dirs) > 1:
            raise UsageError("--out: give a directory when reporting several runs")
        out = run_dirs[0] / "report"
    runs = [read_run(d, name) for d, name in find_runs(run_dirs)]
    sweeps = [(d.resolve().name, json.loads((d / "summary.json").read_text()))
              for d in run_dirs if (d / "summary.json").is_file()]
    console = Console()
    for run in runs:
        console.rule(run.name)
        console.print(federated_table(run.results))
        console.print(personalization_table(run.results))
        if run.study:
            console.print(points_table(run.study))
            console.print(selection_table(run.study))
    if len(runs) > 1:
        console.rule("all runs")
        console.print(comparison_table([(run.name, run.results) for run in runs]))
    warnings = Console(stderr=True)
    for line in run_differences([(run.name, run.results) for run in runs]):
        warnings.print(f"[yellow]warning: {escape(line)}[/yellow]", soft_wrap=True)
    for path in write_report(runs, out, sweeps):
        console.print(f"wrote {path}")
