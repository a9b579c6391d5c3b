"""`profit-ds export RUN_DIR OUT`: a run's prompt or LoRA adapter as a PEFT adapter folder."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from profit_ds.cli import app


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A finished run's --output-dir."),
           out: Path = typer.Argument(..., help="Directory for the PEFT adapter."),
           client: Optional[str] = typer.Option(None, help="A test client's personalized state instead of the global one."),
           lr: Optional[float] = typer.Option(None, help="Which personalization lr (when the client has several).")) -> None:
    """Export the global (or a personalized) prompt or LoRA adapter for PeftModel.from_pretrained."""
    from profit_ds.export import FORMAT_FILE, export_run

    path = export_run(run_dir, out, client, lr)
    print(f"wrote a PEFT adapter to {path}; {path / FORMAT_FILE} says how to "
          "build its inputs and generate as the run did")
