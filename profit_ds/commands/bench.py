"""`profit-ds bench`: the training and generation benchmark, `scripts/bench.py`, from the CLI.

The benchmark lives in scripts/ (it builds its own model and compares against a PEFT loop, which
is no part of the package), so this command needs a source checkout; every option, `--help`
included, goes to the script.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer

from profit_ds.cli import app
from profit_ds.errors import UsageError

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench.py"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def bench(ctx: typer.Context) -> None:
    """Benchmark: profit-ds (K=1, K=auto) vs a PEFT per-client loop, toy and SmolLM2 workloads; --help for options."""
    if not SCRIPT.is_file():
        raise UsageError(f"profit-ds bench runs {SCRIPT.name} from a source checkout of profit-ds; "
                         "this installation has none")
    code = subprocess.call([sys.executable, str(SCRIPT), *ctx.args])
    if code:
        raise typer.Exit(code)
