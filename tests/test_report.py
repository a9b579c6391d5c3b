"""`profit-ds report` over several runs (one comparison table, warnings when the runs differ in
backbone or data) and what results.json's `environment` records, on fabricated results.json
files: no training."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from profit_ds import io
from profit_ds.config import resolve
from profit_ds.report import best_personalized, comparison_table, run_differences
from profit_ds.environment import environment


def _scores(local: float, glob: float) -> dict:
    return {"local_rouge_l": local, "global_rouge_l": glob, "local_exact_match": local / 2,
            "global_exact_match": glob / 2}


def fabricated(shift: float = 0.0, manifest: str = "m0", **config) -> dict:
    """A results.json a finished run could have written: 2 test clients, lrs 1 and 30 for 2
    epochs (lr 30 epoch 2 has the best local ROUGE-L)."""
    cfg = resolve(None, dict(rounds=3, personalize_lrs=[1.0, 30.0], personalize_epochs=2,
                             **config)).to_dict()
    clients = ("c0", "c1")
    fed = {**_scores(30 + shift, 28 + shift), "clients": dict.fromkeys(clients, 30 + shift)}
    pers = [{"lr": lr, "epoch": ep, **_scores(30 + shift + lr / 10 * ep, 28 + shift - lr / 30 * ep)}
            for lr in (1.0, 30.0) for ep in (1, 2)]
    return {"config": cfg,
            "data": {"manifest_hash": manifest, "train_clients": 4, "validation_clients": 2,
                     "test_clients": 2, "global_test_examples": 8, "truncation": {}},
            "rounds": [{"round": r, "train_loss": 2.0 - r / 10, "val_rouge_l": 20.0 + r}
                       for r in range(3)],
            "initial": _scores(10 + shift, 9 + shift), "global": fed, "personalized": pers,
            "personalized_clients": [{"client": c, **p} for c in clients for p in pers],
            "timing": {"total_s": 1.0, "train_s": 0.5, "personalize_s": 0.5,
                       "personalize_score_s": 0.25},
            "environment": {}}


def _write(d: Path, results: dict) -> Path:
    io.write_json(d / "results.json", results)
    return d


def _report(*dirs: Path, out: Path, **kw):
    from profit_ds.cli import _register, app
    _register()
    res = CliRunner(**kw).invoke(app, ["report", *map(str, dirs), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return res


def test_comparison_table_has_one_row_per_run():
    runs = [(f"run{i}", fabricated(shift=i, seed=i)) for i in range(3)]
    table = comparison_table(runs)
    assert table.row_count == 3
    console = Console(width=250, record=True)
    console.print(table)
    text = console.export_text()
    best = best_personalized(runs[2][1])
    assert (best["lr"], best["epoch"]) == (30.0, 2)
    for name, results in runs:
        line = next(row for row in text.splitlines() if f" {name} " in row)
        b = best_personalized(results)
        for s in (results["initial"], results["global"], b):
            assert f"{s['local_rouge_l']:.2f} / {s['global_rouge_l']:.2f}" in line
        assert "30, 2" in line and "fedavg adam/sgd" in line and "tiny (fp32)" in line


def test_report_prints_one_comparison_and_warns_only_when_runs_differ(tmp_path):
    """Same backbone and data at two seeds: one comparison table, no warning. A different
    model or dtype, or different data (a data option, or a different partition at the same
    seed): one yellow line on stderr per kind of difference."""
    a = _write(tmp_path / "a", fabricated(seed=0, manifest="m0"))
    b = _write(tmp_path / "b", fabricated(shift=5, seed=1, manifest="m1"))
    res = _report(a, b, out=tmp_path / "r1")
    assert res.stdout.count("Runs compared") == 1
    assert "warning" not in res.stderr and "differ" not in res.output
    assert len(run_differences([("a", fabricated()), ("b", fabricated(seed=3))])) == 0

    model = _write(tmp_path / "model", fabricated(model="tiny-other", seed=0))
    res = _report(a, model, out=tmp_path / "r2", env={"FORCE_COLOR": "1", "COLUMNS": "300"})
    lines = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(lines) == 1 and "differ in backbone" in lines[0] and "Pareto plot" in lines[0]
    assert "tiny, tiny-other" in lines[0] and "\x1b[33m" in lines[0]  # yellow
    assert "warning" not in res.stdout

    data = _write(tmp_path / "data", fabricated(data="/somewhere/sni", dtype="bf16"))
    res = _report(a, b, data, out=tmp_path / "r3")
    assert res.stdout.count("Runs compared") == 1
    warnings = [line for line in res.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 2
    assert "differ in backbone (dtype: fp32, bf16)" in warnings[0]
    assert "differ in data (data: builtin, /somewhere/sni)" in warnings[1]

    lines = run_differences([("a", fabricated(heterogeneity="iid")),
                             ("b", fabricated(heterogeneity="task"))])
    assert lines == ["these runs differ in data (heterogeneity: iid, task): the Pareto plot "
                     "mixes them on one frontier"]
    lines = run_differences([("a", fabricated(manifest="m0")), ("b", fabricated(manifest="m1"))])
    assert len(lines) == 1 and "partition manifest hash at seed 0" in lines[0]


def test_one_run_has_no_comparison_table(tmp_path):
    res = _report(_write(tmp_path / "a", fabricated()), out=tmp_path / "r")
    assert "Runs compared" not in res.stdout and "warning" not in res.stderr


def test_environment_records_versions_commit_and_devices():
    env = environment()
    for package in ("profit-ds", "torch", "deepspeed", "transformers", "peft", "accelerate",
                    "rouge-score"):
        assert env["versions"][package], package
    assert env["python"].count(".") == 2 and env["cpu_cores"] >= 1
    names = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
             if torch.cuda.is_available() else None)
    assert env["devices"] and (names is None or env["devices"] == names)
    assert all(isinstance(d, str) and d for d in env["devices"])
    source = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                          text=True)
    if head.returncode == 0 and (source / "profit_ds").is_dir():
        assert env["commit"] == head.stdout.strip() and isinstance(env["dirty"], bool)


@pytest.mark.parametrize("failure", [FileNotFoundError("git"),
                                     subprocess.TimeoutExpired("git", 5)])
def test_environment_never_fails_over_git(monkeypatch, failure):
    def broken(*args, **kw):
        raise failure
    monkeypatch.setattr(subprocess, "run", broken)
    env = environment()
    assert env["commit"] is None and env["dirty"] is None and env["versions"]["torch"]
