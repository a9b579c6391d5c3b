"""What a run shows on the terminal: Rich progress while working, Rich tables at the end.

Only rank 0 reports; on other ranks every method is a no-op, so the training code calls it
unconditionally.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

Advance = Callable[..., None]


class Reporter:
    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        """A progress bar; yields `advance(n, status="")`."""
        if not self.enabled:
            yield lambda n=1, status="": None
            return
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            tid = progress.add_task(description, total=total, status="")

            def advance(n: int = 1, status: str = "") -> None:
                progress.update(tid, advance=n, status=status)
            yield advance

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]{message}[/yellow]")

    def data_summary(self, partition, backbone, k_parallel: int) -> None:
        if not self.enabled:
            return
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.model.parameters())
        self.console.print(
            f"[bold]profit-ds[/bold]  backbone {backbone.name} ({n_params / 1e6:.2f}M params, "
            f"{str(backbone.dtype).replace('torch.', '')}, "
            f"{'ZeRO-3' if backbone.engine is not None else 'whole on 1 rank'})  clients: "
            f"{len(partition.train_clients)} train / {len(partition.validation_clients)} "
            f"validation / {len(partition.test_clients)} test  global test: "
            f"{len(partition.global_test)} examples  clients in parallel: {k_parallel}")

    def results(self, results: dict, out: Path) -> None:
        if not self.enabled:
            return
        console = Console()
        console.print(federated_table(results))
        console.print(personalization_table(results))
        t = results["timing"]
        console.print(f"done in {t['total_s']:.0f}s (training {t['train_s']:.0f}s, "
                      f"personalization {t['personalize_s']:.0f}s); files in {out}/")


def federated_table(results: dict) -> Table:
    table = Table(title="Federated prompt: ROUGE-L (exact match)")
    for col in ("prompt", "local ROUGE-L", "global ROUGE-L", "local EM", "global EM"):
        table.add_column(col, justify="right" if col != "prompt" else "left")
    for label, key in (("initial", "initial"), ("federated", "global")):
        s = results[key]
        table.add_row(label, f"{s['local_rouge_l']:.2f}", f"{s['global_rouge_l']:.2f}",
                      f"{s['local_exact_match']:.2f}", f"{s['global_exact_match']:.2f}")
    return table


def personalization_table(results: dict) -> Table:
    base = results["global"]
    table = Table(title="Personalization: mean over test clients (change vs. federated prompt)")
    for col in ("lr", "epoch", "local ROUGE-L", "global ROUGE-L"):
        table.add_column(col, justify="right")
    for row in results["personalized"]:
        dl = row["local_rouge_l"] - base["local_rouge_l"]
        dg = row["global_rouge_l"] - base["global_rouge_l"]
        table.add_row(f"{row['lr']:g}", str(row["epoch"]),
                      f"{row['local_rouge_l']:.2f} ({dl:+.2f})",
                      f"{row['global_rouge_l']:.2f} ({dg:+.2f})")
    return table
