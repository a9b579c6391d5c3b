"""SNI loading, instruction format, bad input and the `data` command, on the real sample slice."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from profit_ds.data.format import (FormatSpec, TruncationReport, format_source, truncate_source,
                                   truncate_target)
from profit_ds.data.loading import load_tasks
from profit_ds.data.sni import load_sni_directory
from profit_ds.errors import UsageError

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "sni-sample" / "tasks"


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Keep the Arrow cache out of ~/.cache so tests neither share nor leave state."""
    monkeypatch.setenv("PROFIT_DS_CACHE", str(tmp_path_factory.mktemp("cache")))


def _sample_file(name: str) -> dict:
    return json.loads((SAMPLE / f"{name}.json").read_text(encoding="utf-8"))


def _write_task(directory: Path, name: str, record: dict | str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


def _good_task() -> dict:
    return {"Definition": ["Say yes."], "Categories": ["Misc"], "Input_language": ["English"],
            "Output_language": ["English"], "Positive Examples": [],
            "Instances": [{"id": "t-0", "input": "a", "output": ["yes"]},
                          {"id": "t-1", "input": "b", "output": ["yes"]}]}


# --------------------------------------------------------------------------- loading
def test_every_sample_task_loads_with_its_categories_and_instances():
    tasks = load_tasks(str(SAMPLE))
    assert len(tasks) == 24
    for task in tasks:
        record = _sample_file(task.name)
        assert task.categories == tuple(record["Categories"])
        assert task.definition == "\n".join(record["Definition"])
        assert len(task.instances) == len(record["Instances"])
        first, last = record["Instances"][0], record["Instances"][-1]
        assert task.instances[0].id == first["id"]
        assert task.instances[0].outputs == tuple(first["output"])
        assert task.instances[-1].input == last["input"]
        assert len(task.positive_examples) == len(record["Positive Examples"])
    assert len({t.category for t in tasks}) == 8


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path: Path):
    corpus, cache = tmp_path / "tasks", tmp_path / "cache"
    shutil.copytree(SAMPLE, corpus)
    load_sni_directory(corpus, cache_dir=cache)
    load_sni_directory(corpus, cache_dir=cache)
    assert len(list((cache / "sni").iterdir())) == 1
    (corpus / "task020_mctaco_span_based_question.json").touch()
    load_sni_directory(corpus, cache_dir=cache)
    assert len(list((cache / "sni").iterdir())) == 2


def test_language_filter_drops_translation_tasks_and_any_keeps_them(tmp_path: Path):
    _write_task(tmp_path, "task1_en", _good_task())
    _write_task(tmp_path, "task2_en_hi", {**_good_task(), "Output_language": ["Hindi"]})
    assert [t.name for t in load_tasks(str(tmp_path))] == ["task1_en"]
    assert len(load_tasks(str(tmp_path), languages=["any"])) == 2
    assert [t.name for t in load_tasks(str(tmp_path), languages=["English", "Hindi"])] == [
        "task1_en", "task2_en_hi"]


def test_clone_layout_uses_split_files(tmp_path: Path):
    for name in ("task1_a", "task2_b", "task3_c"):
        _write_task(tmp_path / "tasks", name, _good_task())
    splits = tmp_path / "splits" / "default"
    splits.mkdir(parents=True)
    (splits / "train_tasks.txt").write_text("task1_a\n")
    (splits / "test_tasks.txt").write_text("task2_b\n")

    def names(split: str) -> list[str]:
        return [t.name for t in load_tasks(str(tmp_path), task_split=split)]

    assert names("default") == ["task1_a", "task2_b"]
    assert names("test") == ["task2_b"]
    assert names("all") == ["task1_a", "task2_b", "task3_c"]


# --------------------------------------------------------------------------- bad input
def _error(directory: Path, **kwargs) -> str:
    with pytest.raises(UsageError) as err:
        load_tasks(str(directory), **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name, record, field", [
    ("malformed", '{"Definition": ["x"], "Instances": [', "malformed JSON"),
    ("no_instances", {k: v for k, v in _good_task().items() if k != "Instances"}, "'Instances'"),
    ("empty_instances", {**_good_task(), "Instances": []}, "'Instances'"),
    ("no_definition", {k: v for k, v in _good_task().items() if k != "Definition"},
     "'Definition'"),
    ("no_output", {**_good_task(), "Instances": [{"id": "x", "input": "a"}]},
     "Instances[0]: field 'output'"),
    ("empty_output", {**_good_task(), "Instances": [{"id": "x", "input": "a", "output": []}]},
     "Instances[0]: field 'output'"),
    ("no_categories", {k: v for k, v in _good_task().items() if k != "Categories"},
     "'Categories'"),
])
def test_bad_task_file_names_file_and_field(tmp_path: Path, name: str, record, field: str):
    path = _write_task(tmp_path, name, record)
    message = _error(tmp_path)
    assert str(path) in message and field in message


def test_missing_directory(tmp_path: Path):
    assert "no such directory" in _error(tmp_path / "nowhere")


def test_directory_without_task_files(tmp_path: Path):
    assert "no task *.json" in _error(tmp_path)


def test_empty_after_language_filter(tmp_path: Path):
    _write_task(tmp_path, "task1", _good_task())
    assert "no task left after filtering" in _error(tmp_path, languages=["French"])


def test_missing_language_field_is_named(tmp_path: Path):
    record = {k: v for k, v in _good_task().items() if k != "Input_language"}
    path = _write_task(tmp_path, "task1", record)
    message = _error(tmp_path)
    assert str(path) in message and "'Input_language'" in message


def test_split_file_naming_a_missing_task(tmp_path: Path):
    _write_task(tmp_path / "tasks", "task1", _good_task())
    splits = tmp_path / "splits" / "default"
    splits.mkdir(parents=True)
    (splits / "train_tasks.txt").write_text("task1\ntask404_gone\n")
    (splits / "test_tasks.txt").write_text("")
    message = _error(tmp_path)
    assert "train_tasks.txt" in message and "task404_gone" in message


def test_hub_failure_is_one_line(monkeypatch: pytest.MonkeyPatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\n(long details)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match=r"^--data hf:someone/sni: could not load .*"
                                         r"ConnectionError: Couldn't reach") as err:
        load_tasks("hf:someone/sni")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- format
def test_format_options():
    task = next(t for t in load_tasks(str(SAMPLE)) if t.name.startswith("task020"))
    inst = task.instances[0]
    plain = format_source(task, inst)
    assert plain.startswith("Definition: ") and plain.endswith(f"Input: {inst.input.strip()}\n"
                                                              "Output:")
    demos = format_source(task, inst, FormatSpec(num_positive_examples=2))
    assert "Positive Example 2 -" in demos and "Positive Example 3" not in demos
    assert not format_source(task, inst, FormatSpec(add_definition=False)).startswith(
        "Definition")


def test_truncation_keeps_head_and_tail_and_is_reported():
    ids = list(range(10))
    assert truncate_source(ids, 6, keep_tail=2) == [0, 1, 2, 3, 8, 9]
    assert truncate_source(ids, None, keep_tail=2) == ids
    assert truncate_target(ids, 3) == [0, 1, 2]
    report = TruncationReport()
    report.record(source_cut=True, target_cut=False)
    report.record(source_cut=False, target_cut=False)
    assert report.summary()["source_truncated_fraction"] == 0.5


# --------------------------------------------------------------------------- CLI
def test_data_command_json():
    from typer.testing import CliRunner

    from profit_ds import cli

    cli._register()
    result = CliRunner().invoke(cli.app, ["data", "--data", str(SAMPLE), "--heterogeneity",
                                          "categories:1", "--num-clients", "12", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["clients"] == {"train": 8, "validation": 2, "test": 2}  # run's fractions
    assert "would refuse this: --clients-per-round 12: only 8 train clients" in result.stderr
    assert summary["loaded"] == {"tasks": 24, "categories": 8, "instances": 1375}
    assert summary["mean_client_category_entropy"] == 0.0
    assert len(summary["manifest_hash"]) == 64
