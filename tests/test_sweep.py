"""`profit-ds sweep`: the sweep file's checks, the cell plan, the summary's arithmetic, and the
must-show of issue 5: a sweep SIGKILLed after its first cell and restarted skips that cell
(its files untouched), runs the rest and ends with the same summary as an uninterrupted one."""
from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from profit_ds import sweep as sw
from profit_ds.checkpoint import EXECUTION_ONLY
from profit_ds.errors import UsageError

# The built-in model, not conftest's random one: a random model scores 0 everywhere, which
# would make "the same summary" true whatever the sweep did.
TINY_RUN = {"model": "tiny", "rounds": 2, "clients_per_round": 2, "num_clients": 12,
            "instances_per_task": 6, "batch_size": 4, "prompt_tokens": 4,
            "personalize_lrs": [0.5, 2.0], "personalize_epochs": 1, "max_new_tokens": 4,
            "eval_every": 0}
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _write(path: Path, spec) -> Path:
    path.write_text(yaml.safe_dump(spec) if not isinstance(spec, str) else spec)
    return path


def _main(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    """`profit-ds sweep ARGV` in this process, through the CLI's own error mapping."""
    from profit_ds import cli
    monkeypatch.setattr(sys, "argv", ["profit-ds", "sweep", *argv])
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- spec errors
GOOD = {"base": {"rounds": 2}, "settings": [{"name": "a", "algo": "fedavg"}],
        "grid": {"heterogeneity": ["task", "iid"]}, "seeds": [0, 1]}


@pytest.mark.parametrize("change,needles", [
    ({"grids": {}}, ["grids", "unknown key"]),
    ({"base": {"roundz": 3}}, ["base.roundz", "unknown option"]),
    ({"base": {"rounds": "ten"}}, ["base.rounds", "expected int"]),
    ({"base": {"seed": 3}}, ["base.seed", "seeds"]),
    ({"base": {"rounds": 2, "algo": "fedsgd"}}, ["settings[0].algo", "base"]),
    ({"grid": {"rounds": [1, 2]}}, ["grid.rounds", "base"]),
    ({"grid": {"heterogeneity": []}}, ["grid.heterogeneity", "non-empty list"]),
    ({"grid": {"heterogeneity": "task"}}, ["grid.heterogeneity", "non-empty list"]),
    ({"grid": {"client_lr": [0.1, 0.1]}}, ["grid.client_lr[1]", "twice"]),
    ({"seeds": []}, ["seeds", "non-empty list"]),
    ({"seeds": [0, "one"]}, ["seeds[1]", "integer"]),
    ({"settings": [{"name": "a"}, {"name": "a", "algo": "fedsgd"}]}, ["settings[1].name", "twice"]),
    ({"settings": [{"algo": "fedsgd"}]}, ["settings[0].name"]),
    # values config.validate rejects: named by flag and by cell, before any cell runs
    ({"grid": {"client_lr": [0.1, -1]}}, ["cell 3/4", "--client-lr"]),
    ({"settings": [{"name": "a"}, {"name": "b", "algo": "fedopt"}]}, ["cell 5/8", "--algo"]),
    # values only the data can refuse: checked for every cell before the first one runs
    ({"grid": {"heterogeneity": ["task", "clusters:3"]}}, ["cell 3", "--heterogeneity"]),
    ({"grid": {"clients_per_round": [2, 99]}}, ["cell 3", "--clients-per-round 99"]),
    # settings the model cannot run (its config and tokenizer are fetched, never its weights)
    ({"grid": {"prompt_tokens": [4, 600]}}, ["cell 3", "--prompt-tokens 600", "context"]),
    ({"grid": {"heterogeneity": ["dirichlet:0.5", "dirichlet/0.5"]}}, ["same directory"]),
])
def test_bad_sweep_file_is_one_line_exit_2_naming_file_and_field(change, needles, tmp_path,
                                                                 monkeypatch, capsys):
    spec = {**GOOD, "base": {"rounds": 2, "instances_per_task": 6}, **change}
    path = _write(tmp_path / "bad.yaml", spec)
    out = tmp_path / "out"
    code, _, err = _main(monkeypatch, capsys, "--config", str(path), "--output-dir", str(out))
    assert code == 2, err
    assert str(path) in err and all(n in err for n in needles), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # nothing ran, nothing was written


@pytest.mark.parametrize("text,needle", [("seeds: [0, 1\n", "cannot parse"),
                                         ("- 1\n- 2\n", "expected a mapping")])
def test_malformed_sweep_file(text, needle, tmp_path, monkeypatch, capsys):
    path = _write(tmp_path / "bad.yaml", text)
    code, _, err = _main(monkeypatch, capsys, "--config", str(path))
    assert code == 2 and needle in err and str(path) in err, err
    code, _, err = _main(monkeypatch, capsys, "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and "--config" in err and "no such file" in err


# --------------------------------------------------------------------------- planning
def test_cells_are_settings_x_grid_x_seeds_with_stable_slugs(tmp_path):
    spec = sw.parse_spec({
        "base": {"rounds": 3, "num-clients": 12},
        "settings": [{"name": "fedavg adam", "algo": "fedavg", "client_opt": "adam"},
                     {"name": "fedsgd", "algo": "fedsgd", "server_opt": "adam",
                      "server_lr": 1}],
        "grid": {"heterogeneity": ["task", "dirichlet:0.5"], "client_lr": [0.1, 1]},
        "seeds": [0, 7]}, "s.yaml")
    cells = sw.plan_cells(spec)
    assert len(cells) == 2 * 2 * 2 * 2 and [c.index for c in cells] == list(range(1, 17))
    # settings outermost, then the grid's product in the file's key order, seeds innermost
    assert [(c.setting, dict(c.grid)["heterogeneity"], dict(c.grid)["client_lr"], c.seed)
            for c in cells[:6]] == [
        ("fedavg adam", "task", 0.1, 0), ("fedavg adam", "task", 0.1, 7),
        ("fedavg adam", "task", 1.0, 0), ("fedavg adam", "task", 1.0, 7),
        ("fedavg adam", "dirichlet:0.5", 0.1, 0), ("fedavg adam", "dirichlet:0.5", 0.1, 7)]
    assert cells[4].group == "fedavg-adam__heterogeneity=dirichlet-0.5__client_lr=0.1"
    assert cells[4].label == "fedavg adam heterogeneity=dirichlet:0.5 client_lr=0.1"
    assert cells[4].directory(tmp_path) == tmp_path / cells[4].group / "seed-0"
    assert cells[-1].group == "fedsgd__heterogeneity=dirichlet-0.5__client_lr=1.0"
    assert len({c.group for c in cells}) == 8
    # every cell's config: base + its setting + its grid values + its seed
    cfg = sw.cell_config(cells[-1], tmp_path, 1, len(cells), "s.yaml")
    assert (cfg.rounds, cfg.num_clients, cfg.algo, cfg.server_opt, cfg.server_lr,
            cfg.heterogeneity, cfg.client_lr, cfg.seed) == \
        (3, 12, "fedsgd", "adam", 1.0, "dirichlet:0.5", 1.0, 7)
    assert cfg.output_dir == str(cells[-1].directory(tmp_path))
    assert "client_opt" not in cells[-1].values  # settings do not leak into each other
    # stable: the same spec written differently plans the same directories
    again = sw.parse_spec({"seeds": [0, 7], "grid": {"heterogeneity": ["task", "dirichlet:0.5"],
                                                     "client-lr": [0.1, 1.0]},
                           "settings": spec.settings, "base": {"num_clients": 12, "rounds": 3}},
                          "t.yaml")
    assert [c.directory(tmp_path) for c in sw.plan_cells(again)] == \
        [c.directory(tmp_path) for c in cells]
    assert again.canonical() == spec.canonical()


def test_without_settings_or_grid_cells_are_just_seeds(tmp_path):
    cells = sw.plan_cells(sw.parse_spec({"seeds": [3, 1]}, "s.yaml"))
    assert [(c.group, c.seed, c.label) for c in cells] == [("base", 3, "base"), ("base", 1, "base")]


def test_restart_refuses_another_sweep_or_a_foreign_run(tmp_path):
    out = tmp_path / "out"
    spec = sw.parse_spec({"base": {"instances_per_task": 6}, "seeds": [0]}, "s.yaml")
    cell = sw.plan_cells(spec)[0]
    (out).mkdir()
    (out / "sweep.yaml").write_text(yaml.safe_dump({**spec.canonical(), "seeds": [0, 1]}))
    with pytest.raises(UsageError, match="holds a different sweep"):
        sw.prepare_sweep(spec, out)
    (out / "sweep.yaml").write_text(yaml.safe_dump(spec.canonical()))
    d = cell.directory(out)
    d.mkdir(parents=True)
    foreign = sw.cell_config(cell, out, 1, 1, "s.yaml").to_dict()
    (d / "results.json").write_text(json.dumps({"config": {**foreign, "rounds": 99}}))
    with pytest.raises(UsageError, match="another config.*--overwrite"):
        sw.prepare_sweep(spec, out)
    assert sw.prepare_sweep(spec, out, overwrite=True).status == ["conflict"]
    # the same config, written by another machine setup (execution-only keys differ): finished
    (d / "results.json").write_text(json.dumps({"config": {**foreign, "num_procs": 4,
                                                            "eval_batch_size": 7}}))
    assert sw.prepare_sweep(spec, out).status == ["finished"]
    (d / "results.json").unlink()
    (d / "config.json").write_text(json.dumps(foreign))
    # killed before its first checkpoint: nothing to resume, so it starts anew
    assert sw.prepare_sweep(spec, out).status == ["new"]
    from profit_ds.runner import CHECKPOINTS
    (d / CHECKPOINTS).mkdir()
    (d / CHECKPOINTS / "ckpt-000001.safetensors").write_bytes(b"")
    assert sw.prepare_sweep(spec, out).status == ["unfinished"]


def test_dry_run_lists_cells_and_writes_nothing(tmp_path, monkeypatch, capsys):
    path = _write(tmp_path / "s.yaml", {**GOOD, "base": {"instances_per_task": 6}})
    out = tmp_path / "out"
    code, stdout, err = _main(monkeypatch, capsys, "--config", str(path), "--output-dir",
                              str(out), "--dry-run")
    assert code == 0, err
    assert stdout.splitlines() == [
        f"cell {i}/4 a heterogeneity={h} seed {s}: new -> {out}/a__heterogeneity={h}/seed-{s}"
        for i, (h, s) in enumerate([("task", 0), ("task", 1), ("iid", 0), ("iid", 1)], 1)]
    assert not out.exists()


def test_dry_run_downloads_nothing_but_checks_models_it_has(tmp_path, monkeypatch, capsys):
    """A hub model not in the cache is listed, not fetched; a model at hand is still checked
    against every cell (here the built-in one, whose context a cell's prompt exceeds)."""
    hub = _write(tmp_path / "hub.yaml", {"base": {"model": "profit-ds-tests/not-cached"},
                                          "seeds": [0]})
    code, stdout, err = _main(monkeypatch, capsys, "--config", str(hub), "--output-dir",
                              str(tmp_path / "o1"), "--dry-run")
    assert code == 0 and stdout.startswith("cell 1/1"), err
    long = _write(tmp_path / "long.yaml", {"grid": {"prompt_tokens": [4, 600]}, "seeds": [0]})
    code, _, err = _main(monkeypatch, capsys, "--config", str(long), "--output-dir",
                         str(tmp_path / "o2"), "--dry-run")
    assert code == 2 and "cell 2/2" in err and "--prompt-tokens 600" in err, err


# --------------------------------------------------------------------------- summary
def _results(initial, fed_local, fed_global, personalized):
    """A results.json as runner writes it, reduced to what the summary reads; personalized:
    {(lr, epoch): (local, global)}."""
    return {"initial": {"global_rouge_l": initial, "local_rouge_l": -1.0},
            "global": {"local_rouge_l": fed_local, "global_rouge_l": fed_global},
            "personalized": [{"lr": lr, "epoch": ep, "local_rouge_l": loc,
                              "global_rouge_l": glo}
                             for (lr, ep), (loc, glo) in personalized.items()]}


def test_summary_mean_and_sample_std_over_seeds():
    spec = sw.parse_spec({"settings": [{"name": "a"}, {"name": "b", "algo": "fedsgd"}],
                          "seeds": [0, 1, 2]}, "s.yaml")
    cells = sw.plan_cells(spec)

    def pers(x):  # epoch 1 values must not matter
        return {(1.0, 1): (0.0, 0.0), (1.0, 2): (x, x / 2), (30.0, 1): (99.0, 99.0),
                (30.0, 2): (x + 1, 0.0)}
    results = [_results(10.0, 40.0, 30.0, pers(50.0)), _results(20.0, 40.0, 31.0, pers(60.0)),
               _results(60.0, 40.0, 35.0, pers(70.0))] + \
        [_results(5.0, 1.0, 2.0, {(1.0, 2): (3.0, 4.0)})] * 3
    summary = sw.summarize(cells, results)
    a, b = summary["groups"]
    assert (a["group"], a["n"], a["seeds"]) == ("a", 3, [0, 1, 2])
    # by hand: mean 30, deviations -20 -10 30, sum of squares 1400, / (3 - 1) = 700
    assert a["initial_global_rouge_l"]["mean"] == pytest.approx(30.0)
    assert a["initial_global_rouge_l"]["std"] == pytest.approx(math.sqrt(700))
    assert a["initial_global_rouge_l"]["values"] == [10.0, 20.0, 60.0]
    assert a["federated_local_rouge_l"] == {"mean": 40.0, "std": 0.0, "values": [40.0] * 3}
    # mean 32, deviations -2 -1 3, squares 14, / 2 = 7
    assert a["federated_global_rouge_l"]["std"] == pytest.approx(math.sqrt(7))
    # the last epoch of each lr, never epoch 1
    assert [(p["lr"], p["epoch"]) for p in a["personalized"]] == [(1.0, 2), (30.0, 2)]
    lr1, lr30 = a["personalized"]
    assert lr1["local_rouge_l"]["mean"] == pytest.approx(60.0)
    assert lr1["local_rouge_l"]["std"] == pytest.approx(10.0)
    assert lr1["global_rouge_l"]["mean"] == pytest.approx(30.0)
    assert lr1["global_rouge_l"]["std"] == pytest.approx(5.0)
    assert lr30["local_rouge_l"]["mean"] == pytest.approx(61.0)
    assert b["initial_global_rouge_l"]["std"] == 0.0

    one = sw.summarize(cells[:1], results[:1])["groups"][0]
    assert one["n"] == 1 and one["initial_global_rouge_l"]["std"] is None
    assert sw.mean_std(one["initial_global_rouge_l"]) == "10.00 ± -"
    assert sw.mean_std(a["initial_global_rouge_l"]) == "30.00 ± 26.46"

    rows = list(csv.DictReader(io.StringIO(sw.summary_csv(summary))))
    assert len(rows) == 2 * 4 + 2 * 2 + 2  # 4 prompt metrics per group + 2 per lr
    row = next(r for r in rows if r["group"] == "a" and r["metric"] ==
               "personalized_local_rouge_l" and r["lr"] == "1.0")
    assert (row["epoch"], float(row["mean"]), float(row["std"]), row["seeds"]) == \
        ("2", 60.0, 10.0, "3")


# --------------------------------------------------------------------------- the must-show
def _sweep_proc(spec_path: Path, out: Path, **kw):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    return [sys.executable, "-m", "profit_ds", "sweep", "--config", str(spec_path),
            "--output-dir", str(out)], dict(env=env, text=True, **kw)


def _snapshot(d: Path) -> dict:
    return {p.relative_to(d): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(d.rglob("*")) if p.is_file()}


def _comparable(cell_dir: Path) -> dict:
    res = json.loads((cell_dir / "results.json").read_text())
    for key in ("timing", "environment"):
        res.pop(key)
    for r in res["rounds"]:
        r.pop("seconds")
    for measured in ("memory_gb", "memory_source"):  # free RAM when the cell started
        res["resolved"]["budgets"].pop(measured)
    res["config"] = {k: v for k, v in res["config"].items() if k not in EXECUTION_ONLY}
    return res


@pytest.fixture(scope="module")
def must_show_spec(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec")
    return _write(d / "sweep.yaml", {"base": TINY_RUN,
                                     "settings": [{"name": "fedavg-adam", "algo": "fedavg",
                                                   "client_opt": "adam"}],
                                     "seeds": [0, 1, 2]})


def test_interrupted_sweep_restarts_skipping_finished_cells(must_show_spec, tmp_path,
                                                            monkeypatch, capsys):
    cells = sw.plan_cells(sw.load_spec(str(must_show_spec)))
    assert len(cells) == 3

    # an uninterrupted sweep: one backbone load for the three cells
    full = tmp_path / "full"
    args, kw = _sweep_proc(must_show_spec, full, capture_output=True)
    res = subprocess.run(args, check=False, **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("loading backbone") == 1
    assert "Sweep: ROUGE-L" in res.stdout
    expected = json.loads((full / "summary.json").read_text())
    assert expected["groups"][0]["n"] == 3

    # the same sweep, SIGKILLed once the first cell has finished
    out = tmp_path / "killed"
    first = cells[0].directory(out) / "results.json"
    args, kw = _sweep_proc(must_show_spec, out, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(args, **kw)
    deadline = time.time() + 300
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "summary.json").exists()
    assert not cells[-1].directory(out).joinpath("results.json").exists()
    before = _snapshot(cells[0].directory(out))

    args, kw = _sweep_proc(must_show_spec, out, capture_output=True)
    res = subprocess.run(args, check=False, **kw)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "cell 1/3 fedavg-adam seed 0: skipped (finished)" in res.stderr
    assert "cell 3/3 fedavg-adam seed 2: running" in res.stderr
    assert _snapshot(cells[0].directory(out)) == before  # not rewritten: bytes and mtimes
    assert json.loads((out / "summary.json").read_text()) == expected
    for cell in cells:  # every cell as if never interrupted (backbone shared or not)
        assert _comparable(cell.directory(out)) == _comparable(cell.directory(full))
    csv_text = (out / "summary.csv").read_text()
    assert csv_text == (full / "summary.csv").read_text()

    # once more: every cell is skipped, nothing is loaded, the same table comes out
    everything = _snapshot(out)
    code, stdout, err = _main(monkeypatch, capsys, "--config", str(must_show_spec),
                              "--output-dir", str(out))
    assert code == 0, err
    assert err.count("skipped (finished)") == 3 and "loading backbone" not in err
    assert "Sweep: ROUGE-L" in stdout and "fedavg-adam" in stdout
    after = _snapshot(out)
    assert {p: v for p, v in after.items() if p.name not in sw.SUMMARY_FILES} == \
        {p: v for p, v in everything.items() if p.name not in sw.SUMMARY_FILES}
    assert json.loads((out / "summary.json").read_text()) == expected
