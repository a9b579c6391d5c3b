"""`profit-ds models`: the aliases `--model` accepts, with their sizes.

Why: choosing a backbone for a GPU budget starts from its size, and whether it is gated tells
the user to log in to the hub before a long job fails on its download.
"""
from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from profit_ds.cli import app
from profit_ds.model.aliases import ALIASES, ModelAlias
from profit_ds.model.builtin import BUILTIN_NAMES


def human_params(count: int) -> str:
    """6738415616 -> '6.74B', 494032768 -> '494M'."""
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"


def alias_row(alias: ModelAlias) -> dict:
    """One alias as JSON: what the table shows, plus the shape numbers."""
    return {"alias": alias.name, "hf_id": alias.hf_id, "params": alias.params,
            "bf16_gb": alias.bf16_bytes / 1e9, "hidden_size": alias.hidden_size,
            "layers": alias.num_layers, "vocab_size": alias.vocab_size, "gated": alias.gated}


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")
           ) -> None:
    """List model aliases with sizes; any HF id or local path works as --model too."""
    rows = [alias_row(a) for a in ALIASES.values()]
    if as_json:
        print(json.dumps({"builtin": list(BUILTIN_NAMES), "aliases": rows}))
        return
    table = Table(title="Models for --model (also: any HF id or local path)",
                  caption="gated: accept the licence on the hub, then `huggingface-cli login`")
    table.add_column("alias", no_wrap=True)
    table.add_column("HF id", overflow="fold")
    table.add_column("params", justify="right")
    table.add_column("bf16 size", justify="right")
    table.add_column("gated")
    table.add_row(BUILTIN_NAMES[0], "built-in, offline", "", "", "")
    for row in rows:
        table.add_row(row["alias"], row["hf_id"], human_params(row["params"]),
                      f"{row['bf16_gb']:.1f} GB", "yes" if row["gated"] else "")
    Console().print(table)
