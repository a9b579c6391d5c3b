"""`profit-ds score FILE.jsonl`: score predictions against references, SNI-style.

Any JSONL of `{"prediction": str, "references": [str, ...]}` lines works; a run's own
predictions files (RUN_DIR/predictions/*.jsonl) carry more fields, and `--by` groups by them,
so each number in results.json can be recomputed from the predictions behind it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.table import Table

from profit_ds.cli import app
from profit_ds.errors import UsageError

MAX_LINE_BYTES = 16 << 20  # a line longer than this is not a prediction: refuse, don't load it


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, streamed: a file of any size needs one line's memory,
    and a line past MAX_LINE_BYTES is refused before it is read whole."""
    with path.open("rb") as f:
        lineno = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise UsageError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES >> 20} MiB")
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UsageError(f"{path}:{lineno}: not UTF-8 text (byte {err.start + 1})"
                                 ) from None


def read_rows(path: Path) -> list[dict]:
    """The file's rows, each checked: errors name the file, the line and the field."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    rows = []
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as err:
            why = err.msg if isinstance(err, json.JSONDecodeError) else "nested too deep"
            raise UsageError(f"{path}:{lineno}: not valid JSON ({why})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prediction"), str):
            raise UsageError(f"{path}:{lineno}: field 'prediction' must be a string")
        refs = row.get("references")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise UsageError(f"{path}:{lineno}: field 'references' must be a non-empty list of "
                             "strings")
        rows.append(row)
    return rows


def group_scores(rows: list[dict], keys: list[str], path: Path) -> list[dict]:
    """Scores per distinct value of `keys`, groups in order of first appearance."""
    from profit_ds.evaluation.rouge import score_predictions

    groups: dict[tuple, list[dict]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise UsageError(f"{path}: --by {missing[0]}: not a field of row {i + 1}")
        groups.setdefault(tuple(json.dumps(row[k]) for k in keys), []).append(row)
    return [{**{k: members[0][k] for k in keys},
             **score_predictions([r["prediction"] for r in members],
                                 [r["references"] for r in members])}
            for members in groups.values()]


@app.command()
def score(file: Path = typer.Argument(..., help="JSONL: {\"prediction\": str, \"references\": [str, ...]} per line (a run's predictions/*.jsonl)."),
          by: Optional[str] = typer.Option(None, "--by", help="Comma-separated fields to group by (e.g. client,lr,epoch,set for a run's personalized.jsonl); adds the mean over the groups."),
          as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")) -> None:
    """Mean ROUGE-L (rouge-score rougeL F, Porter stemming, max over references) and exact match."""
    from profit_ds.evaluation.rouge import score_predictions

    rows = read_rows(file)
    result = score_predictions([r["prediction"] for r in rows], [r["references"] for r in rows])
    keys = [k.strip() for k in (by or "").split(",") if k.strip()]
    groups = group_scores(rows, keys, file) if keys else []
    if groups:
        mean = {m: sum(g[m] for g in groups) / len(groups) for m in ("rouge_l", "exact_match")}
        result = {**result, "groups": groups, "mean_over_groups": {**mean, "n": len(groups)}}
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"Scores for {file}")
    for col in (*keys, "examples", "ROUGE-L", "exact match"):
        table.add_column(col, justify="right")
    for g in groups:
        table.add_row(*(str(g[k]) for k in keys), str(g["n"]), f"{g['rouge_l']:.2f}",
                      f"{g['exact_match']:.2f}")
    if groups:
        table.add_row(*(["mean over groups"] + [""] * (len(keys) - 1)), str(len(groups)),
                      f"{result['mean_over_groups']['rouge_l']:.2f}",
                      f"{result['mean_over_groups']['exact_match']:.2f}", style="bold")
    table.add_row(*(["all lines"] + [""] * (len(keys) - 1) if keys else []), str(result["n"]),
                  f"{result['rouge_l']:.2f}", f"{result['exact_match']:.2f}")
    Console().print(table)
