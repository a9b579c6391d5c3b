"""`profit-ds score FILE.jsonl`: score predictions against references, SNI-style."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from profit_ds.cli import app
from profit_ds.errors import UsageError


def read_predictions(path: Path) -> tuple[list[str], list[list[str]]]:
    """Read `{"prediction": str, "references": [str, ...]}` lines; errors name file and line."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    predictions, references = [], []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prediction"), str):
            raise UsageError(f"{path}:{lineno}: field 'prediction' must be a string")
        refs = row.get("references")
        if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
            raise UsageError(f"{path}:{lineno}: field 'references' must be a non-empty list of strings")
        predictions.append(row["prediction"])
        references.append(refs)
    return predictions, references


@app.command()
def score(file: Path = typer.Argument(..., help="JSONL: {\"prediction\": str, \"references\": [str, ...]} per line"),
          as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table.")) -> None:
    """Mean ROUGE-L (rouge-score rougeL F, Porter stemming, max over references) and exact match."""
    from profit_ds.evaluation.rouge import score_predictions

    result = score_predictions(*read_predictions(file))
    if as_json:
        print(json.dumps(result))
        return
    table = Table(title=f"Scores for {file}")
    for col in ("examples", "ROUGE-L", "exact match"):
        table.add_column(col, justify="right")
    table.add_row(str(result["n"]), f"{result['rouge_l']:.2f}", f"{result['exact_match']:.2f}")
    Console().print(table)
