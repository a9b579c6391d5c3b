"""`profit-ds sweep --config SWEEP.yaml`: a grid of runs (federated settings x grid values x
seeds), one after another, resumable, with one summary table (mean ± std over seeds) at the end.

The work is in `profit_ds.sweep`; this module is the command line (docs/STUDY.md describes the
file format and the output).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from profit_ds.cli import app
from profit_ds.errors import UsageError


@app.command()
def sweep(
    config: str = typer.Option(..., help="The sweep file (YAML or JSON): base, settings, grid, seeds, output_dir."),
    output_dir: Optional[str] = typer.Option(None, help="Where the cells and the summary go (default: the file's output_dir, else runs/<file name>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Continue in a directory whose sweep.yaml differs, and replace cells holding a run of another config (finished cells of the same config are kept)."),
    num_procs: int = typer.Option(1, help="Ranks on this machine, as for `profit-ds run`."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check the file and every cell's config, list the cells and their state, run nothing."),
) -> None:
    """Run every cell of a sweep not finished yet; print and write the summary over seeds."""
    from profit_ds import sweep as sw

    if num_procs < 1:
        raise UsageError(f"--num-procs must be > 0, got {num_procs}")
    spec = sw.load_spec(config)
    out = output_dir or spec.output_dir or str(Path("runs") / Path(config).stem)
    # every check, on every rank, before a process group or a file is made
    plan = sw.prepare_sweep(spec, out, num_procs=num_procs, overwrite=overwrite,
                            dry_run=dry_run)
    if dry_run:
        for line in plan.lines():
            print(line)
        return
    if num_procs > 1 and "WORLD_SIZE" not in os.environ:
        from profit_ds.commands.run import launch_local_ranks
        code = launch_local_ranks(num_procs)
        if code:
            raise SystemExit(code)  # not typer.Exit: main() would drop its code
        return
    from profit_ds import distributed
    from profit_ds.report import Reporter

    distributed.setup()  # ranks must be known before anyone prints or writes
    reporter = Reporter(enabled=distributed.is_main())

    def say(line: str) -> None:
        if reporter.enabled:
            reporter.console.print(line, highlight=False, markup=False)

    try:
        summary = sw.run_sweep(plan, say)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (errors.Terminated)
        print("interrupted; run the same command again to continue (finished cells are "
              "skipped, the unfinished one resumes)", file=sys.stderr)
        raise SystemExit(getattr(stop, "exit_code", 130)) from None
    if reporter.enabled:
        console = Console()
        console.print(sw.summary_table(summary))
        console.print(f"wrote {Path(out) / 'summary.json'}, {Path(out) / 'summary.csv'}")
