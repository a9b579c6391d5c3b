"""One entry point from a `--data` value to tasks, so every command reads data the same way."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.sni import load_sni_directory, load_sni_hub
from profit_ds.data.types import Task

HUB_PREFIX = "hf:"


def load_tasks(data: str, languages: Sequence[str] | None = ("English",),
               task_split: str = "default", cache_dir: Path | None = None,
               builtin_instances: int = 100) -> list[Task]:
    """Tasks for `data`: "builtin", a directory (SNI clone or task JSON files) or "hf:NAME".

    languages: keep tasks whose input and output languages are all listed (None or "any":
    keep every task). task_split: default | train | test | all (see `sni.selected_task_names`).
    The built-in suite is English and has no splits, so both are ignored for it; it has
    `builtin_instances` instances per task.
    """
    if data == "builtin":
        return builtin_tasks(instances_per_task=builtin_instances)
    if data.startswith(HUB_PREFIX):
        return load_sni_hub(data[len(HUB_PREFIX):], languages, task_split)
    return load_sni_directory(Path(data).expanduser(), languages, task_split, cache_dir)
