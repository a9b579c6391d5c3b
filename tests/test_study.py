"""The personalization study (issue 5) on a tiny finished run: the identities the proximal
term and interpolation must satisfy whatever the model, model selection, and `report`'s files."""
from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from conftest import UNTRAINED
from profit_ds import io
from profit_ds.config import resolve
from profit_ds.errors import UsageError
from profit_ds.evaluation.generate import evaluate
from profit_ds.fl.optim import ClientOptimizer
from profit_ds.fl.personalize import PersonalizeSpec, personalize
from profit_ds.plots import (CSV_COLUMNS, SETTING_SOURCES, find_runs, pareto_front,
                              sweep_points)
from profit_ds.runner import run
from profit_ds.selection import StudyGrid
from profit_ds.study import load_run, run_study

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory, backbone):
    """A tiny run (2 rounds, lr 5 personalization) and the same run rebuilt by `load_run`."""
    out = tmp_path_factory.mktemp("study_run")
    cfg = resolve(None, dict(UNTRAINED, model=str(tiny_model_dir), rounds=2, clients_per_round=2,
                             num_clients=12, instances_per_task=6, personalize_lrs=[5.0],
                             personalize_epochs=1, eval_every=1, output_dir=str(out),
                             clients_in_parallel="8", prompt_tokens=4, max_new_tokens=4))
    return out, run(cfg), load_run(out)


def _personalize(loaded, lrs=(5.0,), epochs=1, batch_size=None, **kw):
    """Personalize the rebuilt run's test clients (by default at lr 5 for one epoch, like the
    run did)."""
    spec = PersonalizeSpec(ClientOptimizer("sgd"), lrs, epochs,
                           batch_size or loaded.cfg.batch_size, loaded.cfg.seed, **kw)

    def score(bank, requests, tags=()):
        return evaluate(loaded.backbone, bank, requests, loaded.new_tokens, 64)
    records, prompts = personalize(loaded.backbone, loaded.model,
                                   loaded.data.test_clients, loaded.data.global_test, spec, 8,
                                   score)
    return records, {name: {setting: s["prompt"] for setting, s in by.items()}
                     for name, by in prompts.items()}


def test_lambda_zero_is_plain_personalization(finished):
    """The study rebuilds the run exactly: lambda 0 gives the run's own prompts, bit for bit."""
    out, _, loaded = finished
    _, prompts = _personalize(loaded, prox_lambdas=(0.0,))
    for name, by_setting in prompts.items():
        with safe_open(out / "clients" / f"{name}.safetensors", "pt") as f:
            assert torch.equal(by_setting[(5.0, 0.0)], f.get_tensor("lr=5"))


def test_a_lambda_grid_in_one_bank_equals_one_bank_per_lambda(finished):
    """lr and lambda are per-row values: (client, lr, lambda) rows of one bank train as they
    would apart (a row's gradient does not depend on its batch mates)."""
    _, _, loaded = finished
    _, grid = _personalize(loaded, lrs=(1.0, 5.0), batch_size=2, prox_lambdas=(0.0, 0.1))
    for lam in (0.0, 0.1):
        _, alone = _personalize(loaded, lrs=(1.0, 5.0), batch_size=2, prox_lambdas=(lam,))
        for name, by_setting in alone.items():
            for setting, prompt in by_setting.items():
                assert torch.allclose(grid[name][setting], prompt, rtol=1e-5, atol=1e-7)
    some = next(iter(grid.values()))
    assert not torch.allclose(some[(5.0, 0.0)], some[(5.0, 0.1)])  # lambda did something


def test_huge_lambda_keeps_the_global_prompt(finished):
    """lambda 1e4 with lr 1e-4 (lr * lambda = 1): each step lands at p_global - lr * grad,
    while plain SGD keeps adding steps (several per epoch with batches of 2)."""
    _, _, loaded = finished
    _, plain = _personalize(loaded, lrs=(1e-4,), epochs=2, batch_size=2)
    _, prox = _personalize(loaded, lrs=(1e-4,), epochs=2, batch_size=2, prox_lambdas=(1e4,))
    for name in prox:
        moved = (plain[name][(1e-4, 0.0)] - loaded.model["prompt"]).norm()
        held = (prox[name][(1e-4, 1e4)] - loaded.model["prompt"]).norm()
        assert held <= 1e-4 * loaded.model["prompt"].norm() and held < moved / 2


def test_interpolation_endpoints_reproduce_global_and_local_scores(finished):
    _, results, loaded = finished
    records, _ = _personalize(loaded, alphas=(0.0, 0.5, 1.0))
    fed = results["global"]
    for rec in records:
        at = {i["alpha"]: i for i in rec["interpolated"]}
        for metric in ("local_rouge_l", "global_rouge_l", "local_exact_match",
                       "global_exact_match"):
            assert at[1.0][metric] == rec[metric]
        assert at[0.0]["local_rouge_l"] == pytest.approx(fed["clients"][rec["client"]], abs=1e-9)
        assert at[0.0]["global_rouge_l"] == pytest.approx(fed["global_rouge_l"], abs=1e-9)


@pytest.fixture(scope="module")
def study(finished):
    out, _, loaded = finished
    grid = StudyGrid(lrs=(0.0, 5.0), epochs=1, prox_lambdas=(0.0, 0.1), alphas=(0.0, 0.5))
    result = run_study(loaded, grid)
    io.write_json(out / "study.json", result)
    return result


def test_selection_follows_the_recorded_rule(study):
    sel = study["selected"]
    assert "validation" in sel["rule"] and set(study["federated"]) == {"test", "validation"}
    floor = study["federated"]["validation"]["global_rouge_l"] - 1.0
    val = [p for p in study["points"] if p["split"] == "validation"]
    eligible = [p for p in val if p["global_rouge_l"] >= floor]
    assert eligible, "alpha 0 is the federated prompt itself, so it always qualifies"
    assert sel["chosen_on"]["local_rouge_l"] == max(p["local_rouge_l"] for p in eligible)
    assert sel["test"]["split"] == "test"
    assert all(sel["test"][k] == v for k, v in sel["setting"].items())
    # 2 lrs x 2 lambdas x 1 epoch x alphas {0, 0.5, 1} per split
    assert len(val) == len(study["points"]) / 2 == 12


def test_report_writes_pngs_and_csv(finished, study, tmp_path):
    from profit_ds.cli import _register, app
    _register()
    out, results, _ = finished
    res = CliRunner().invoke(app, ["report", str(out), "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    name = out.resolve().name
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted([f"{name}_{kind}.png" for kind in
                           ("tradeoff", "rounds", "clients", "study_tradeoff",
                            "regularization", "interpolation")]
                          + ["pareto.png"])
    for png in tmp_path.glob("*.png"):
        data = png.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    with (tmp_path / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    sources = [r["source"] for r in rows]
    assert sources.count("federated") == 1
    assert sources.count("personalized") == len(results["personalized"])
    assert sources.count("personalized_client") == len(results["personalized_clients"])
    assert sources.count("study") == len(study["points"])
    assert json.loads((out / "study.json").read_text())["selected"] == study["selected"]


def test_pareto_front_matches_brute_force():
    """On small integer grids (many ties on one coordinate, identical points) and on floats."""
    rng = random.Random(0)
    for trial in range(500):
        n, grid = rng.randrange(0, 25), rng.choice((3, 6, None))
        points = [(rng.randrange(grid), rng.randrange(grid)) if grid else
                  (rng.random(), rng.random()) for _ in range(n)]
        front = pareto_front(points)
        dominated = {i for i, p in enumerate(points) for q in points
                     if q[0] >= p[0] and q[1] >= p[1] and q != p}
        assert sorted(front) == [i for i in range(n) if i not in dominated], points
        xs = [points[i][0] for i in front]
        assert xs == sorted(xs) and (n == 0 or front)


def _copy_run(src, dst, shift: float = 0.0):
    """What `report` reads of a finished run, at `dst`; `shift` moves the federated prompt
    right (global ROUGE-L) and the personalized points up (local), so that they dominate the
    original run's."""
    dst.mkdir(parents=True)
    results = json.loads((src / "results.json").read_text())
    results["global"]["global_rouge_l"] += shift
    for row in results["personalized"]:
        row["local_rouge_l"] += shift
    io.write_json(dst / "results.json", results)
    if (src / "study.json").is_file():
        (dst / "study.json").write_text((src / "study.json").read_text())


def test_report_over_a_directory_of_runs(finished, study, tmp_path):
    """A sweep-like directory expands to its runs; pareto.png is a real image and points.csv
    flags exactly pareto_front's points."""
    from matplotlib.image import imread

    from profit_ds.cli import _register, app
    _register()
    out = finished[0]
    sweep = tmp_path / "sweep"
    _copy_run(out, sweep / "fedavg-adam" / "seed-0")
    _copy_run(out, sweep / "fedsgd" / "seed-0", shift=100.0)
    res = CliRunner().invoke(app, ["report", str(sweep), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    report = tmp_path / "report"
    for prefix in ("fedavg-adam_seed-0", "fedsgd_seed-0"):
        assert (report / f"{prefix}_tradeoff.png").is_file()
    pareto = report / "pareto.png"
    assert pareto.read_bytes().startswith(PNG_SIGNATURE)
    image = imread(pareto)
    assert image.shape[0] >= 400 and image.shape[1] >= 600 and image.std() > 0
    with (report / "points.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert list(dict.fromkeys(r["run"] for r in rows)) == ["fedavg-adam/seed-0", "fedsgd/seed-0"]
    settings = [r for r in rows if r["source"] in SETTING_SOURCES and r["split"] == "test"]
    assert all(r["on_pareto_front"] == "" for r in rows if r not in settings)
    front = set(pareto_front([(float(r["global_rouge_l"]), float(r["local_rouge_l"]))
                              for r in settings]))
    assert [r["on_pareto_front"] for r in settings] == [
        str(i in front) for i in range(len(settings))]
    on = {(r["run"], r["source"]): r["on_pareto_front"] for r in settings
          if r["source"] != "study"}
    assert on == {("fedavg-adam/seed-0", "federated"): "False",
                  ("fedavg-adam/seed-0", "personalized"): "False",
                  ("fedsgd/seed-0", "federated"): "True",
                  ("fedsgd/seed-0", "personalized"): "True"}


def _group(name: str, federated: tuple[float, float], lr1: tuple[float, float]) -> dict:
    """One summary.json group over two seeds: (global, local) means of the federated prompt
    and of lr 1 after epoch 2, each seed 1 point either side of the mean."""
    from profit_ds.sweep import stat

    def scores(glob: float, local: float) -> dict:
        return {"global_rouge_l": stat([glob - 1, glob + 1]),
                "local_rouge_l": stat([local - 1, local + 1])}
    fed, pers = scores(*federated), scores(*lr1)
    return {"group": name, "label": name, "setting": name, "grid": {}, "seeds": [0, 1], "n": 2,
            "federated_global_rouge_l": fed["global_rouge_l"],
            "federated_local_rouge_l": fed["local_rouge_l"],
            "personalized": [{"lr": 1.0, "epoch": 2, **pers}]}


def test_report_of_a_sweep_plots_its_settings_means(finished, tmp_path):
    """A sweep directory (summary.json) also gets its settings' means over seeds and their
    Pareto frontier: here b's personalized prompt wins locally, a's globally, and both
    federated prompts are dominated."""
    from profit_ds.cli import _register, app
    _register()
    sweep = tmp_path / "sweep"
    _copy_run(finished[0], sweep / "a" / "seed-0")
    summary = {"groups": [_group("a", (30.0, 30.0), (31.0, 50.0)),
                          _group("b", (20.0, 20.0), (25.0, 80.0))]}
    (sweep / "summary.json").write_text(json.dumps(summary))
    points = sweep_points(summary)
    assert [p["global"]["std"] for p in points] == [2 ** 0.5] * 4
    front = pareto_front([(p["global"]["mean"], p["local"]["mean"]) for p in points])
    assert [points[i]["label"] for i in front] == ["b, lr 1", "a, lr 1"]
    res = CliRunner().invoke(app, ["report", str(sweep), "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    png = tmp_path / "report" / "sweep_settings.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE) and png.stat().st_size > 20000


def test_report_run_names_and_missing_paths(tmp_path):
    """Runs given directly keep their directory's name unless two would clash; a path with
    no run at or below it is a one-line usage error naming it."""
    for rel in ("a/seed-0", "b/seed-0", "c/x/seed-1", "c/y/seed-1"):
        (tmp_path / rel).mkdir(parents=True)
        (tmp_path / rel / "results.json").write_text("{}")
    found = find_runs([tmp_path / "a" / "seed-0", tmp_path / "b" / "seed-0", tmp_path / "c",
                       tmp_path / "a"])
    assert [name for _, name in found] == ["a/seed-0", "b/seed-0", "x/seed-1", "y/seed-1"]
    assert [path for path, _ in found] == [(tmp_path / r).resolve() for r in
                                         ("a/seed-0", "b/seed-0", "c/x/seed-1", "c/y/seed-1")]
    assert [name for _, name in find_runs([tmp_path / "c" / "x" / "seed-1"])] == ["seed-1"]
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(UsageError, match=f"^{missing}: not a finished run"):
            find_runs([tmp_path / "a", missing])
