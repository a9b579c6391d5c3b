"""Every scored example as one JSONL line under RUN_DIR/predictions/, so any number in
results.json can be re-scored (`profit-ds score FILE --by KEYS`) or read example by example.

One file per phase:
- `backbone.jsonl`, `initial.jsonl`, `federated.jsonl`: a prompt shared by every test client
  (none for the bare backbone), one line per test example; `client` is the test client whose
  local test set holds it. Global ROUGE-L = the file's mean (the global test set is the union
  of the local ones); local ROUGE-L = the mean over clients of `--by client`.
- `validation.jsonl`: the federated prompt on the global validation set, with its `round`.
- `personalized.jsonl`: `client` personalized at `lr` for `epoch` epochs (`alpha` when
  interpolated), scored on its own test set (`set` "local") and the global one ("global");
  `--by client,lr,epoch,set` gives each personalization record's two numbers.

Each line also holds `example` (the instance id), `prediction`, `references` and `rouge_l`
(0-100, as `profit-ds score` computes it). Lines are appended as sets are scored; a resumed run
first drops the lines of work its checkpoint does not vouch for, so no line is counted twice.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from profit_ds import io

DIRECTORY = "predictions"


def set_lines(tags: dict, references: Sequence[Sequence[str]], ids: Sequence[str],
              result: dict) -> list[dict]:
    """The lines of one scored set: `tags` (prompt, client, lr, ...) on every line."""
    return [{**tags, "example": i, "prediction": p, "references": list(r), "rouge_l": s}
            for i, p, r, s in zip(ids, result["predictions"], references,
                                  result["example_rouge_l"])]


class PredictionFiles:
    """The predictions directory of a run; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.directory = run_dir / DIRECTORY
        self.enabled = enabled

    def path(self, phase: str) -> Path:
        return self.directory / f"{phase}.jsonl"

    def write(self, phase: str, lines: Iterable[dict]) -> None:
        """Replace the phase's file (atomically)."""
        if self.enabled:
            io.write_text(self.path(phase), "".join(json.dumps(x) + "\n" for x in lines))

    def append(self, phase: str, lines: Iterable[dict]) -> None:
        """Add lines to the phase's file, flushed to disk."""
        if not self.enabled:
            return
        text = "".join(json.dumps(x) + "\n" for x in lines)
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.path(phase).open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def keep(self, phase: str, wanted: Callable[[dict], bool]) -> None:
        """Keep only the lines `wanted` says a resumed run vouches for (a line cut short by a
        crash is dropped too)."""
        if not self.enabled or not self.path(phase).exists():
            return
        kept = []
        for line in self.path(phase).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if wanted(row):
                kept.append(row)
        self.write(phase, kept)
