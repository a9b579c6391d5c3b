"""`profit-ds run` end to end on small settings: the files and fields of the contract, and the
personalization identities that must hold whatever the model."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import SNI_SAMPLE, UNTRAINED
from safetensors import safe_open

from profit_ds.config import resolve
from profit_ds.fl.algorithms import ALGORITHMS
from profit_ds.runner import run


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory, backbone):
    out = tmp_path_factory.mktemp("run")
    cfg = resolve(None, dict(UNTRAINED, model=str(tiny_model_dir), rounds=2, clients_per_round=3,
                             instances_per_task=10, personalize_lrs=[0.0, 5.0],
                             personalize_epochs=2, eval_every=1, output_dir=str(out),
                             clients_in_parallel="4", prompt_tokens=8))
    return out, run(cfg)


def test_results_follow_the_contract(finished_run):
    out, results = finished_run
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["config"]["rounds"] == 2
    for key in ("config", "rounds", "initial", "global", "personalized", "timing"):
        assert key in on_disk
    for key in ("initial", "global"):
        assert set(on_disk[key]) >= {"local_rouge_l", "global_rouge_l"}
        assert 0.0 <= on_disk[key]["global_rouge_l"] <= 100.0
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2]
    assert all("train_loss" in r and "val_rouge_l" in r for r in on_disk["rounds"])
    assert {(p["lr"], p["epoch"]) for p in on_disk["personalized"]} == \
        {(0.0, 1), (0.0, 2), (5.0, 1), (5.0, 2)}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    assert on_disk["data"]["manifest_hash"] == results["data"]["manifest_hash"]


def test_backbone_row_and_predictions_rescore_every_number(finished_run):
    """The bare backbone is scored as its own row; every scored set's predictions are in
    predictions/*.jsonl, and `profit-ds score --by` recomputes the reported numbers."""
    out, results = finished_run
    assert set(results["backbone"]) >= {"local_rouge_l", "global_rouge_l"}
    assert results["resolved"]["chat_template"] is False  # the tiny tokenizer has none
    assert (out / "predictions" / "backbone.jsonl").is_file()

    def rescore(phase: str, *by: str) -> dict:
        args = ["score", str(out / "predictions" / f"{phase}.jsonl"), "--json"]
        res = _cli(*args, *(["--by", ",".join(by)] if by else []))
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    for phase, key in (("backbone", "backbone"), ("initial", "initial"), ("federated", "global")):
        whole = rescore(phase, "client")
        assert whole["rouge_l"] == pytest.approx(results[key]["global_rouge_l"], abs=1e-9)
        assert whole["mean_over_groups"]["rouge_l"] == pytest.approx(
            results[key]["local_rouge_l"], abs=1e-9)
    groups = rescore("personalized", "client", "lr", "epoch", "set")["groups"]
    by_key = {(g["client"], g["lr"], g["epoch"], g["set"]): g["rouge_l"] for g in groups}
    assert len(by_key) == 2 * len(results["personalized_clients"])
    for record in results["personalized_clients"]:
        key = (record["client"], record["lr"], record["epoch"])
        assert by_key[(*key, "local")] == record["local_rouge_l"]
        assert by_key[(*key, "global")] == record["global_rouge_l"]
    rounds = rescore("validation", "round")["groups"]
    assert [g["rouge_l"] for g in rounds] == [r["val_rouge_l"] for r in results["rounds"]]


def test_prompt_files(finished_run, backbone):
    out, results = finished_run
    with safe_open(out / "global_prompt.safetensors", "pt") as f:
        assert f.get_tensor("prompt").shape == (8, backbone.hidden_size)
    clients = sorted(p.stem for p in (out / "clients").glob("*.safetensors"))
    assert clients == sorted({r["client"] for r in results["personalized_clients"]})
    with safe_open(out / "clients" / f"{clients[0]}.safetensors", "pt") as f:
        assert set(f.keys()) == {"lr=0", "lr=5"}


def test_personalization_at_lr_zero_leaves_scores_unchanged(finished_run):
    _, results = finished_run
    fed = results["global"]
    for row in results["personalized"]:
        if row["lr"] == 0.0:
            assert row["local_rouge_l"] == pytest.approx(fed["local_rouge_l"], abs=1e-9)
            assert row["global_rouge_l"] == pytest.approx(fed["global_rouge_l"], abs=1e-9)
    per_client = {r["client"]: r for r in results["personalized_clients"]
                  if r["lr"] == 0.0 and r["epoch"] == 2}
    for name, local in fed["clients"].items():
        assert per_client[name]["local_rouge_l"] == pytest.approx(local, abs=1e-9)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "profit_ds", *args], capture_output=True,
                          text=True, cwd=cwd)


@pytest.mark.parametrize("args,needle", [
    (["--rounds", "0"], "--rounds"),
    (["--client-lr", "-1"], "--client-lr"),
    (["--algo", "fedopt"], "--algo fedopt: expected one of " + ", ".join(ALGORITHMS)),
    (["--clients-in-parallel", "many"], "--clients-in-parallel"),
    (["--clients-per-round", "99"], "--clients-per-round"),
    (["--model", "./no/such/dir"], "--model"),
    (["--config", "missing.yaml"], "--config"),
])
def test_bad_flags_give_one_line_and_exit_2(args, needle, tmp_path):
    out = _cli("run", "--output-dir", str(tmp_path / "o"), *args)
    assert out.returncode == 2, out.stderr
    assert needle in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("text,needle", [
    ("rounds: ten\n", "rounds: expected int"),
    ("personalize_lrs: 3\n", "personalize_lrs: expected a list of numbers"),
    ("algo: [fedavg]\n", "algo: expected str"),
])
def test_config_file_values_of_the_wrong_type_give_one_line(text, needle, tmp_path):
    """A --config value of the wrong type is named with its file and key, not a TypeError."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    out = _cli("run", "--output-dir", str(tmp_path / "o"), "--config", str(cfg))
    assert out.returncode == 2, out.stderr
    assert f"--config {cfg}: {needle}" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_finished_run_is_not_overwritten(finished_run):
    out, _ = finished_run
    before = (out / "results.json").read_bytes()
    res = _cli("run", "--output-dir", str(out), "--model", "tiny")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (out / "results.json").read_bytes() == before


def test_builtin_model_runs_from_the_cli(tmp_path):
    """The real default path: built-in model, built-in suite, console output and files."""
    res = _cli("run", "--rounds", "1", "--clients-per-round", "2", "--instances-per-task", "10",
               "--personalize-lrs", "1", "--personalize-epochs", "1", "--algo", "fedsgd",
               "--server-opt", "adam", "--server-lr", "0.01",
               "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Federated prompt" in res.stdout and "Personalization" in res.stdout
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["config"]["algo"] == "fedsgd"
    assert results["config"]["model"] == "tiny"


def test_real_sni_sample_runs_end_to_end(tmp_path):
    """Issue 3's check: the real SNI slice through the whole pipeline with the built-in model
    (scores are low: the tiny model never saw SNI; the point is that the pipeline is real)."""
    res = _cli("run", "--data", str(SNI_SAMPLE), "--rounds", "1", "--clients-per-round", "2",
               "--max-per-client", "12", "--max-source-tokens", "64", "--max-new-tokens", "8",
               "--personalize-lrs", "1", "--personalize-epochs", "1",
               "--output-dir", str(tmp_path / "o"))
    assert res.returncode == 0, res.stderr[-2000:]
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["data"]["test_clients"] >= 1
    assert results["data"]["truncation"]["sources_truncated"] > 0
    names = {r["client"] for r in results["personalized_clients"]}
    assert all(n.startswith("task") for n in names)
