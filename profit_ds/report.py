"""What a run shows: progress while working (a Rich bar on a terminal, plain lines in a log),
Rich tables at the end, and the same in the run's log file.

Only rank 0 reports; on other ranks every method is a no-op, so the training code calls it
unconditionally.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from profit_ds.config import DATA_FIELDS

Advance = Callable[..., None]


class Reporter:
    """Progress, warnings and tables of one command, on rank 0 (a no-op elsewhere).

    On a terminal, progress is a Rich bar. Anywhere else (a pipe, a batch job's log file) a
    bar would print only when its phase ends, which on a cluster can be hours of silence; there
    each phase prints plain lines instead (phase, done/total, status, elapsed, ETA), after every
    status change (every round) and at least every `heartbeat_s` seconds. With `log`, the same
    plain lines, the warnings and the final tables also go to that file (a run's `run.log`),
    timestamped, whatever the terminal shows. Progress and warnings go to stderr; stdout holds
    only a command's own output (its tables).
    """

    def __init__(self, enabled: bool = True, console: Console | None = None,
                 log: Path | None = None, heartbeat_s: float = 30.0) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=True)
        self.heartbeat_s = heartbeat_s
        self._log = log if enabled else None
        if self._log is not None:
            self._log.parent.mkdir(parents=True, exist_ok=True)

    def log(self, line: str) -> None:
        """Append one timestamped line to the log file (if any)."""
        if self._log is not None:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            with self._log.open("a", encoding="utf-8") as f:
                f.write(f"{stamp} {line}\n")

    @contextmanager
    def task(self, description: str, total: int) -> Iterator[Advance]:
        """A phase of `total` units; yields `advance(n=1, status="")`."""
        if not self.enabled:
            yield lambda n=1, status="": None
            return
        plain = not self.console.is_terminal
        line = _PhaseLine(description, total)
        lock = threading.Lock()

        def emit(force: bool = False) -> None:
            with lock:
                news = (line.done, line.status) != line.shown
                if (force and news) or time.monotonic() - line.printed >= self.heartbeat_s:
                    text = line.render()
                    line.printed, line.shown = time.monotonic(), (line.done, line.status)
                    self.log(text)
                    if plain:
                        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

        stop = threading.Event()

        def heartbeat() -> None:
            while not stop.wait(min(self.heartbeat_s, 1.0)):
                emit()

        beat = threading.Thread(target=heartbeat, daemon=True)
        emit(force=True)
        beat.start()
        try:
            if plain:
                def advance(n: int = 1, status: str = "") -> None:
                    changed = bool(status) and status != line.status
                    line.step(n, status)
                    emit(force=changed)
                yield advance
            else:
                columns = (TextColumn("[bold]{task.description}"), BarColumn(),
                           MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                           TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
                with Progress(*columns, console=self.console, transient=False) as progress:
                    tid = progress.add_task(description, total=total, status="")

                    def advance(n: int = 1, status: str = "") -> None:
                        changed = bool(status) and status != line.status
                        line.step(n, status)
                        progress.update(tid, advance=n, status=status)
                        emit(force=changed)
                    yield advance
        finally:
            stop.set()
            beat.join()
            emit(force=True)

    def warn(self, message: str) -> None:
        if self.enabled:
            self.console.print(f"[yellow]{escape(message)}[/yellow]")
            self.log(f"warning: {message}")

    def info(self, message: str) -> None:
        """A plain line on the progress stream (stderr) and in the log."""
        if self.enabled:
            self.console.print(message, markup=False, highlight=False, soft_wrap=True)
            self.log(message)

    def data_summary(self, partition, backbone, k_parallel: int) -> None:
        if not self.enabled:
            return
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in backbone.model.parameters())
        self.info(
            f"profit-ds  backbone {backbone.name} ({n_params / 1e6:.2f}M params, "
            f"{str(backbone.dtype).replace('torch.', '')}, "
            f"{'ZeRO-3' if backbone.engine is not None else 'whole on 1 rank'})  clients: "
            f"{len(partition.train_clients)} train / {len(partition.validation_clients)} "
            f"validation / {len(partition.test_clients)} test  global test: "
            f"{len(partition.global_test)} examples  clients in parallel: {k_parallel}")

    def results(self, results: dict, out: Path) -> None:
        if not self.enabled:
            return
        t = results["timing"]
        done = (f"done in {t['total_s']:.0f}s (training {t['train_s']:.0f}s, "
                f"personalization {t['personalize_s']:.0f}s, of which scoring "
                f"{t['personalize_score_s']:.0f}s); files in {out}/")
        tables = (federated_table(results), personalization_table(results))
        console = Console()
        for table in tables:
            console.print(table)
        console.print(done, markup=False, highlight=False)
        if self._log is not None:
            with self._log.open("a", encoding="utf-8") as f:
                file_console = Console(file=f, width=100, color_system=None)
                for table in tables:
                    file_console.print(table)
            self.log(done)


@dataclass
class _PhaseLine:
    """The state of one phase, as a plain progress line shows it."""

    description: str
    total: int
    done: int = 0
    status: str = ""
    started: float = field(default_factory=time.monotonic)
    printed: float = 0.0
    shown: tuple | None = None  # (done, status) as last printed

    def step(self, n: int, status: str) -> None:
        self.done += n
        if status:
            self.status = status

    def render(self) -> str:
        elapsed = time.monotonic() - self.started
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = (_clock(elapsed / self.done * (self.total - self.done))
               if 0 < self.done <= self.total else "?")
        status = f" | {self.status}" if self.status else ""
        return (f"{self.description}: {self.done}/{self.total}{share}{status} | elapsed "
                f"{_clock(elapsed)} | eta {eta}")


def _clock(seconds: float) -> str:
    """3725.2 -> '1:02:05'."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def adapter_label(cfg: dict) -> str:
    """What the clients trained: 'prompt', or 'LoRA (fedit, r 8)'."""
    if cfg.get("adapter", "prompt") == "prompt":
        return "prompt"
    return f"LoRA ({cfg.get('lora_aggregation')}, r {cfg.get('lora_rank')})"


def federated_table(results: dict) -> Table:
    what = adapter_label(results.get("config", {}))
    table = Table(title=f"Federated {what}: ROUGE-L (exact match)")
    for col in (what, "local ROUGE-L", "global ROUGE-L", "local EM", "global EM"):
        table.add_column(col, justify="right" if col != what else "left")
    rows = [("backbone (no prompt)", "backbone")] if results.get("backbone") else []
    for label, key in rows + [("initial", "initial"), ("federated", "global")]:
        s = results[key]
        table.add_row(label, f"{s['local_rouge_l']:.2f}", f"{s['global_rouge_l']:.2f}",
                      f"{s['local_exact_match']:.2f}", f"{s['global_exact_match']:.2f}")
    return table


def personalization_table(results: dict) -> Table:
    base = results["global"]
    what = adapter_label(results.get("config", {}))
    table = Table(title=f"Personalization: mean over test clients (change vs. federated {what})")
    for col in ("lr", "epoch", "local ROUGE-L", "global ROUGE-L"):
        table.add_column(col, justify="right")
    for row in results["personalized"]:
        dl = row["local_rouge_l"] - base["local_rouge_l"]
        dg = row["global_rouge_l"] - base["global_rouge_l"]
        table.add_row(f"{row['lr']:g}", str(row["epoch"]),
                      f"{row['local_rouge_l']:.2f} ({dl:+.2f})",
                      f"{row['global_rouge_l']:.2f} ({dg:+.2f})")
    return table


def best_personalized(results: dict) -> dict | None:
    """The personalization row (mean over test clients) with the best local ROUGE-L, ties
    going to the better global ROUGE-L; None when the run personalized nothing."""
    rows = results.get("personalized") or []
    return max(rows, key=lambda r: (r["local_rouge_l"], r["global_rouge_l"]), default=None)


def comparison_table(runs: Sequence[tuple[str, dict]]) -> Table:
    """One row per (name, results.json) of `runs`: what the run was, and ROUGE-L
    (local / global) of its initial and federated prompts and of its best personalization
    setting by local ROUGE-L."""
    def pair(s: dict | None) -> str:
        return "-" if not s else f"{s['local_rouge_l']:.2f} / {s['global_rouge_l']:.2f}"
    table = Table(title="Runs compared: ROUGE-L local / global")
    text = ("run", "model", "data", "algo (client/server opt)")
    for col in text + ("seed", "rounds", "initial", "federated", "best personalized",
                       "at lr, epoch"):
        table.add_column(col, justify="left" if col in text else "right", overflow="fold")
    for name, results in runs:
        cfg = results.get("config", {})
        client_opt = "-" if cfg.get("algo") == "fedsgd" else cfg.get("client_opt", "?")
        best = best_personalized(results)
        table.add_row(escape(name),
                      escape(f"{cfg.get('model', '?')} ({cfg.get('dtype', '?')})"),
                      escape(f"{cfg.get('data', '?')} ({cfg.get('heterogeneity', '?')})"),
                      f"{cfg.get('algo', '?')} {client_opt}/{cfg.get('server_opt', '?')}"
                      + ("" if adapter_label(cfg) == "prompt" else f", {adapter_label(cfg)}"),
                      str(cfg.get("seed", "?")), str(cfg.get("rounds", "?")),
                      pair(results.get("initial")),
                      pair(results.get("global")), pair(best),
                      "-" if best is None else f"{best['lr']:g}, {best['epoch']}")
    return table


def _distinct(values: Sequence, most: int = 4) -> str:
    """`a, b, c` of the distinct values in first-seen order (the first `most`, then `...`)."""
    seen = list(dict.fromkeys(str(v) for v in values))
    return ", ".join(seen[:most]) + (f", ... ({len(seen)} in all)" if len(seen) > most else "")


# the run options that decide which examples a run trains and is scored on, but the seed
# the options that decide which examples a run's clients hold (seeds are replicates; the
# clients sampled per round do not change the data)
PARTITION_OPTIONS = tuple(f for f in DATA_FIELDS if f not in ("seed", "clients_per_round"))


def run_differences(runs: Sequence[tuple[str, dict]]) -> list[str]:
    """One line per way the runs are not comparable on one Pareto plot: a different backbone
    (config `model`, `dtype`) or different data (config `data` or the other partition
    options; else different partition manifests at one seed). Seeds alone are replicates
    (each seed partitions the clients its own way), not a difference."""
    configs = [r.get("config", {}) for _, r in runs]
    lines = []

    def differing(keys: Sequence[str]) -> list[str]:
        return [f"{k}: {_distinct([c.get(k) for c in configs])}" for k in keys
                if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
    backbone = differing(("model", "dtype"))
    if backbone:
        lines.append(f"these runs differ in backbone ({'; '.join(backbone)}): the Pareto plot "
                     "mixes them on one frontier")
    data = differing(PARTITION_OPTIONS)
    if not data:
        by_seed: dict = {}
        for _, r in runs:
            digest = r.get("data", {}).get("manifest_hash")
            if digest is not None:
                by_seed.setdefault(r.get("config", {}).get("seed"), set()).add(digest)
        split = [seed for seed, digests in by_seed.items() if len(digests) > 1]
        if split:
            data = [f"partition manifest hash at seed {_distinct(split)}"]
    if data:
        lines.append(f"these runs differ in data ({'; '.join(data)}): the Pareto plot mixes "
                     "them on one frontier")
    return lines
