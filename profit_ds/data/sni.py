"""Super-NaturalInstructions loaders: a directory of per-task JSON files, or a hub copy.

Why an Arrow cache: the full corpus is ~1,600 JSON files and millions of instances, but a
partition uses at most `max_instances` (10,000) of them. Parsing every file on every run would
dominate start-up, and holding every instance as Python objects would dominate memory. So the
first load parses the files once, streams them into two Arrow files (written by `datasets`'
ArrowWriter, read back memory-mapped with `datasets.Dataset.from_file`), and every `Task` gets a
lazy `ArrowInstances` view: only the instances a partition picks become Python objects.

The cache key is every task file's absolute path, mtime and size (plus a format version), so
editing, adding or removing a file rebuilds it; language filtering and split selection happen
after the cache, so changing them never re-parses.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

from profit_ds.cache import cache_dir as profit_cache_dir
from profit_ds.data.types import Instance, Task
from profit_ds.errors import UsageError

if TYPE_CHECKING:
    import pyarrow as pa

CACHE_VERSION = "sni-arrow-v1"
TASK_SPLITS = ("default", "train", "test", "all")
ANY_LANGUAGE = "any"


# --------------------------------------------------------------------------- lazy instances
class ArrowInstances(Sequence[Instance]):
    """A task's instances as a read-only view over rows [start, stop) of the instance table.

    Behaves like the `list[Instance]` a `Task` normally holds (len, indexing, iteration), but
    builds an `Instance` only when one is read, so a 1.6M-instance corpus costs no Python memory
    until a partition samples from it.
    """

    def __init__(self, table: pa.Table, start: int, stop: int) -> None:
        self._rows = table.slice(start, stop - start)  # zero-copy: stays memory-mapped
        self._ids = self._rows.column("id")
        self._inputs = self._rows.column("input")
        self._outputs = self._rows.column("output")

    def __len__(self) -> int:
        return self._rows.num_rows

    @overload
    def __getitem__(self, index: int) -> Instance: ...

    @overload
    def __getitem__(self, index: slice) -> list[Instance]: ...

    def __getitem__(self, index: int | slice) -> Instance | list[Instance]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return Instance(id=self._ids[index].as_py(), input=self._inputs[index].as_py(),
                        outputs=tuple(self._outputs[index].as_py()))

    def __iter__(self) -> Iterator[Instance]:
        for row in self._rows.to_pylist():
            yield Instance(id=row["id"], input=row["input"], outputs=tuple(row["output"]))


# --------------------------------------------------------------------------- directory layout
@dataclass(frozen=True)
class _Layout:
    """Where the task files and (optionally) the official split lists of a corpus live."""

    tasks_dir: Path
    split_dir: Path | None


def _layout(path: Path) -> _Layout:
    """Accept a natural-instructions clone (root with tasks/ and splits/) or a bare task dir."""
    if not path.is_dir():
        raise UsageError(f"--data {path}: no such directory")
    tasks_dir = path / "tasks" if (path / "tasks").is_dir() else path
    split_dir = tasks_dir.parent / "splits" / "default"
    return _Layout(tasks_dir, split_dir if split_dir.is_dir() else None)


def _read_split(split_file: Path, available: set[str]) -> list[str]:
    """Task names listed in an SNI split file; each must have a task file."""
    names = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
    for name in names:
        if name not in available:
            raise UsageError(f"{split_file}: lists task {name!r}, which has no {name}.json")
    return names


def selected_task_names(layout: _Layout, available: set[str], task_split: str) -> set[str]:
    """Which tasks `task_split` selects.

    default: the official split's train + test tasks when the corpus has splits/default, else
    every file; train / test: that split list only; all: every file, ignoring split lists.
    """
    if task_split not in TASK_SPLITS:
        raise UsageError(f"--task-split: unknown value {task_split!r} "
                         f"(expected one of {', '.join(TASK_SPLITS)})")
    if task_split == "all" or (task_split == "default" and layout.split_dir is None):
        return available
    if layout.split_dir is None:
        raise UsageError(f"--task-split {task_split}: {layout.tasks_dir.parent / 'splits/default'}"
                         " does not exist")
    wanted = ("train", "test") if task_split == "default" else (task_split,)
    names: set[str] = set()
    for split in wanted:
        split_file = layout.split_dir / f"{split}_tasks.txt"
        if not split_file.is_file():
            raise UsageError(f"--task-split {task_split}: {split_file} does not exist")
        names.update(_read_split(split_file, available))
    return names


# --------------------------------------------------------------------------- parsing
def _field(path: Path, record: dict, name: str) -> Any:
    """A required, non-empty field of a task file."""
    value = record.get(name)
    if value is None or value == [] or value == "":
        raise UsageError(f"{path}: field {name!r} is missing or empty")
    return value


def _strings(path: Path, value: Any, name: str) -> list[str]:
    """A field SNI stores as a list of strings (a lone string is accepted as a list of one)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise UsageError(f"{path}: field {name!r} must be a string or a list of strings")
    return items


def _instance_rows(path: Path, instances: Any, task: str) -> dict[str, list]:
    """The task's instances as columns (id, input, output), validated."""
    if not isinstance(instances, list):
        raise UsageError(f"{path}: field 'Instances' must be a list")
    columns: dict[str, list] = {"id": [], "input": [], "output": []}
    for i, inst in enumerate(instances):
        where = f"{path}: Instances[{i}]"
        if not isinstance(inst, dict):
            raise UsageError(f"{where} is not an object")
        if not isinstance(inst.get("input"), str):
            raise UsageError(f"{where}: field 'input' is missing or not a string")
        outputs = inst.get("output")
        outputs = [outputs] if isinstance(outputs, str) else outputs
        if not outputs or not isinstance(outputs, list) or not all(
                isinstance(o, str) for o in outputs):
            raise UsageError(f"{where}: field 'output' is missing or empty")
        columns["id"].append(str(inst.get("id") or f"{task}-{i}"))
        columns["input"].append(inst["input"])
        columns["output"].append(outputs)
    return columns


def _positive_examples(path: Path, record: dict) -> list[dict]:
    """Demonstrations as {input, output, explanation} with string fields (first output kept)."""
    demos = []
    for i, demo in enumerate(record.get("Positive Examples") or []):
        if not isinstance(demo, dict) or not isinstance(demo.get("input"), str):
            raise UsageError(f"{path}: Positive Examples[{i}]: field 'input' is missing")
        output = demo.get("output")
        output = output[0] if isinstance(output, list) and output else output
        if not isinstance(output, str):
            raise UsageError(f"{path}: Positive Examples[{i}]: field 'output' is missing")
        demos.append({"input": demo["input"], "output": output,
                      "explanation": str(demo.get("explanation") or "")})
    return demos


def parse_task_file(path: Path) -> tuple[dict, dict[str, list]]:
    """One SNI task file -> (task metadata, instance columns). Raises UsageError on bad input.

    Python's json accepts the bare `NaN` some real files contain (e.g. "URL": [NaN]).
    """
    try:
        with path.open(encoding="utf-8") as handle:
            record = json.load(handle)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path}: malformed JSON (line {err.lineno}, column {err.colno}: "
                         f"{err.msg})") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"{path}: not UTF-8 text ({err.reason})") from None
    except RecursionError:
        raise UsageError(f"{path}: JSON nested too deep to be an SNI task file") from None
    except OSError as err:
        raise UsageError(f"{path}: cannot read ({err.strerror})") from None
    if not isinstance(record, dict):
        raise UsageError(f"{path}: expected a JSON object with SNI task fields")
    name = path.stem
    definition = "\n".join(_strings(path, _field(path, record, "Definition"), "Definition"))
    if not definition.strip():
        raise UsageError(f"{path}: field 'Definition' is missing or empty")
    meta = {
        "name": name,
        "file": str(path),
        "definition": definition,
        "categories": _strings(path, _field(path, record, "Categories"), "Categories"),
        "input_language": _strings(path, record.get("Input_language") or [], "Input_language"),
        "output_language": _strings(path, record.get("Output_language") or [],
                                    "Output_language"),
        "positive_examples": json.dumps(_positive_examples(path, record)),
    }
    return meta, _instance_rows(path, _field(path, record, "Instances"), name)


# --------------------------------------------------------------------------- Arrow cache
def _cache_key(files: list[Path]) -> str:
    """Changes whenever any task file is added, removed, moved, edited or touched."""
    digest = hashlib.sha256(CACHE_VERSION.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_mtime_ns}\0{stat.st_size}\n".encode())
    return digest.hexdigest()[:32]


def _features() -> tuple[Any, Any]:
    """Arrow schemas of the task table and the instance table."""
    from datasets import Features, Sequence as Seq, Value

    tasks = Features({"name": Value("string"), "file": Value("string"),
                      "definition": Value("string"), "categories": Seq(Value("string")),
                      "input_language": Seq(Value("string")),
                      "output_language": Seq(Value("string")),
                      "positive_examples": Value("string"),
                      "start": Value("int64"), "stop": Value("int64")})
    instances = Features({"id": Value("string"), "input": Value("string"),
                          "output": Seq(Value("string"))})
    return tasks, instances


def _build_cache(files: list[Path], target: Path) -> None:
    """Parse every file once, streaming instances to Arrow (one file in memory at a time).

    Written to a temporary directory and renamed, so an interrupted or concurrent build never
    leaves a half-written cache behind.
    """
    from datasets.arrow_writer import ArrowWriter

    task_features, instance_features = _features()
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tasks_out = ArrowWriter(features=task_features, path=str(tmp / "tasks.arrow"))
    inst_out = ArrowWriter(features=instance_features, path=str(tmp / "instances.arrow"))
    offset = 0
    try:
        for path in files:
            meta, columns = parse_task_file(path)
            inst_out.write_batch(columns)
            count = len(columns["id"])
            tasks_out.write({**meta, "start": offset, "stop": offset + count})
            offset += count
        for writer in (tasks_out, inst_out):
            writer.finalize()
            writer.close()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(target)
    except OSError:  # another process finished the same cache first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)


def _open_cache(cache: Path) -> list[tuple[dict, ArrowInstances]]:
    """Task metadata rows and lazy instance views, memory-mapped from the cache."""
    from datasets import Dataset

    tasks = Dataset.from_file(str(cache / "tasks.arrow"))
    instances = Dataset.from_file(str(cache / "instances.arrow")).data.table
    return [(row, ArrowInstances(instances, row["start"], row["stop"]))
            for row in tasks.data.table.to_pylist()]


# --------------------------------------------------------------------------- public loaders
def language_filter(languages: Sequence[str] | None) -> frozenset[str] | None:
    """None means keep every task; "any" among `languages` means the same."""
    if languages is None or ANY_LANGUAGE in {lang.lower() for lang in languages}:
        return None
    return frozenset(lang.lower() for lang in languages)


def _language_ok(meta: dict, wanted: frozenset[str] | None) -> bool:
    """Keep a task only if every input and output language is wanted (drops translation)."""
    if wanted is None:
        return True
    for field, key in (("Input_language", "input_language"),
                       ("Output_language", "output_language")):
        if not meta[key]:
            raise UsageError(f"{meta['file']}: field {field!r} is missing (needed to filter "
                             "on language; pass --language any to keep every task)")
    return all(lang.lower() in wanted for lang in meta["input_language"] + meta["output_language"])


def _to_task(meta: dict, instances: Sequence[Instance], source: str) -> Task:
    return Task(name=meta["name"], definition=meta["definition"],
                categories=tuple(meta["categories"]), instances=instances,  # type: ignore[arg-type]
                positive_examples=json.loads(meta["positive_examples"]), source=source)


def load_sni_directory(path: Path, languages: Sequence[str] | None = ("English",),
                       task_split: str = "default", cache_dir: Path | None = None) -> list[Task]:
    """SNI tasks from a natural-instructions clone or a directory of task JSON files.

    Tasks come back sorted by name; their `instances` are lazy Arrow views (see module doc).
    """
    layout = _layout(Path(path))
    files = {p.stem: p for p in sorted(layout.tasks_dir.glob("*.json"))}
    for p in files.values():
        if not p.is_file():  # False for a dangling symlink, a symlink loop, a directory
            what = ("a directory" if p.is_dir() else "a symlink to nothing readable"
                    if p.is_symlink() else "not a regular file")
            raise UsageError(f"--data {path}: {p} is {what}, not a task file")
    if not files:
        raise UsageError(f"--data {path}: no task *.json files in {layout.tasks_dir}")
    names = selected_task_names(layout, set(files), task_split)
    chosen = [files[name] for name in sorted(names)]
    cache = (cache_dir or profit_cache_dir()) / "sni" / _cache_key(chosen)
    if not (cache / "instances.arrow").is_file():
        _build_cache(chosen, cache)
    wanted = language_filter(languages)
    tasks = [_to_task(meta, instances, source=str(layout.tasks_dir))
             for meta, instances in _open_cache(cache) if _language_ok(meta, wanted)]
    if not tasks:
        raise UsageError(f"--data {path}: no task left after filtering (languages "
                         f"{', '.join(languages or [])}; task split {task_split})")
    return tasks


# --------------------------------------------------------------------------- hub copies
HUB_FIELDS: dict[str, tuple[str, ...]] = {
    "name": ("task_name", "task", "Task"),
    "definition": ("definition", "Definition"),
    "input": ("inputs", "input"),
    "output": ("targets", "output", "outputs"),
    "id": ("id",),
    "categories": ("categories", "Categories", "category"),
    "input_language": ("input_language", "Input_language"),
    "output_language": ("output_language", "Output_language"),
}
HUB_REQUIRED = ("name", "definition", "input", "output")


def _hub_columns(name: str, columns: list[str]) -> dict[str, str]:
    """Map our field names onto the hub dataset's column names (see docs/DATA.md)."""
    found = {field: next((c for c in options if c in columns), "")
             for field, options in HUB_FIELDS.items()}
    for field in HUB_REQUIRED:
        if not found[field]:
            raise UsageError(f"--data hf:{name}: no column for {field!r} (looked for "
                             f"{', '.join(HUB_FIELDS[field])}; columns: {', '.join(columns)})")
    return found


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _hub_tasks(name: str, rows: Iterator[dict], cols: dict[str, str]) -> dict[str, dict]:
    """Group hub rows into tasks; rows sharing an id (one output per row) merge their outputs."""
    tasks: dict[str, dict] = {}
    for n, row in enumerate(rows):
        task_name = str(row[cols["name"]])
        task = tasks.setdefault(task_name, {
            "name": task_name, "file": f"hf:{name} task {task_name}",
            "definition": "\n".join(_as_list(row[cols["definition"]])),
            "categories": _as_list(row[cols["categories"]]) if cols["categories"] else
            [task_name],
            "input_language": _as_list(row.get(cols["input_language"])),
            "output_language": _as_list(row.get(cols["output_language"])),
            "positive_examples": "[]", "instances": {}})
        inst_id = str(row[cols["id"]]) if cols["id"] else f"{task_name}-{n}"
        outputs = _as_list(row[cols["output"]])
        if inst_id in task["instances"]:
            task["instances"][inst_id][1].extend(outputs)
        else:
            task["instances"][inst_id] = (str(row[cols["input"]]), outputs)
    return tasks


def load_sni_hub(name: str, languages: Sequence[str] | None = ("English",),
                 task_split: str = "default") -> list[Task]:
    """SNI tasks from a Hugging Face hub dataset (needs network or a warm `datasets` cache).

    task_split train / test picks that hub split; default and all concatenate every split.
    The language filter applies when the dataset has language columns; without them it is
    taken as it is (e.g. Muennighoff/natural-instructions holds the English default split).
    """
    import datasets

    if task_split not in TASK_SPLITS:
        raise UsageError(f"--task-split: unknown value {task_split!r}")
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # network, auth, missing repo: all one line for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"--data hf:{name}: could not load from the Hugging Face hub "
                         f"({type(err).__name__}: {reason})") from None
    splits = list(loaded) if task_split in ("default", "all") else [task_split]
    if any(split not in loaded for split in splits):
        raise UsageError(f"--data hf:{name}: no {task_split!r} split "
                         f"(has {', '.join(loaded)})")
    cols = _hub_columns(name, loaded[splits[0]].column_names)
    rows = (row for split in splits for row in loaded[split])
    wanted = language_filter(languages)
    tasks = []
    for meta in sorted(_hub_tasks(name, rows, cols).values(), key=lambda m: m["name"]):
        has_languages = bool(meta["input_language"] and meta["output_language"])
        if has_languages and not _language_ok(meta, wanted):
            continue
        instances = [Instance(id=i, input=inp, outputs=tuple(outs))
                     for i, (inp, outs) in meta["instances"].items()]
        tasks.append(_to_task(meta, instances, source=f"hf:{name}"))
    if not tasks:
        raise UsageError(f"--data hf:{name}: no task left after filtering")
    return tasks
