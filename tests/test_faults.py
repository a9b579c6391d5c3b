"""Untrusted names and faults (issue 17), tried as a user would, in fresh processes: names from
the data never choose a path, a run owns its directory, what a resume trusts is verified,
non-finite numbers are caught, and the rest of the bad inputs are one line and exit 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from profit_ds.data.format import to_example
from profit_ds.data.partition import PartitionSpec, build_partition
from profit_ds.data.types import Instance, Task
from profit_ds.names import file_stems

SMALL = ["--rounds", "1", "--clients-per-round", "2", "--personalize-epochs", "1",
         "--personalize-lrs", "1", "--eval-every", "0", "--num-clients", "6",
         "--instances-per-task", "8"]


def profit_ds(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "profit_ds", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines


# --------------------------------------------------------------------------- 1. names
def test_file_stems_are_safe_unique_and_stable():
    names = ["../x", "a/b", ".", "x" * 300, "Task", "task", "plain_name-1.2", "../../victim/m"]
    stems = file_stems(names)
    assert len(set(s.casefold() for s in stems.values())) == len(names)
    for stem in stems.values():
        assert "/" not in stem and not stem.startswith(".") and 0 < len(stem) <= 80
    assert stems["plain_name-1.2"] == "plain_name-1.2"  # a clean name stays itself
    assert file_stems(reversed(names)) == stems


def _hostile_hub_folder(root: Path) -> Path:
    """An `hf:` data set in a local folder whose task names are paths."""
    folder = root / "hub"
    folder.mkdir()
    names = ["../../../../victim/model", "../../ESCAPED_x", "a/b", "Same", "same", "."]
    rows = [{"task_name": name, "definition": "Copy the input.", "inputs": f"word{i} {j}",
             "targets": f"word{i}", "id": f"t{i}-{j}", "categories": ["Copying"]}
            for i, name in enumerate(names) for j in range(8)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_task_names_from_the_data_never_choose_a_path(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.safetensors").write_text("precious")
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    data = _hostile_hub_folder(tmp_path)
    before = {p for p in tmp_path.rglob("*") if "runs" not in p.parts}
    result = profit_ds("run", "--data", f"hf:{data}", "--heterogeneity", "task",
                       "--num-clients", "6", "--validation-fraction", "0.17",
                       "--test-fraction", "0.34", "--rounds", "1", "--clients-per-round", "2",
                       "--personalize-epochs", "1", "--personalize-lrs", "1", "--eval-every",
                       "0", "--output-dir", "runs/r", cwd=work, env={**os.environ,
                                                                     "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (victim / "model.safetensors").read_text() == "precious"
    after = {p for p in tmp_path.rglob("*") if "runs" not in p.parts}
    assert {p for p in after - before if "cache" not in str(p)} == set(), after - before
    out = work / "runs" / "r"
    index = json.loads((out / "clients" / "index.json").read_text())
    assert set(index) == {r["client"] for r in json.loads(
        (out / "results.json").read_text())["personalized_clients"]}
    for file in index.values():
        assert (out / "clients" / file).is_file() and "/" not in file
    assert not (out / ".profit-ds.lock").exists(), "a finished run lets its directory go"


# --------------------------------------------------------------------------- 2. the lock
def test_a_second_run_on_one_directory_is_refused_and_a_dead_ones_lock_is_taken(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "profit_ds", "run", *SMALL, "--rounds",
                              "40", "--output-dir", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended too soon"
        second = profit_ds("run", *SMALL, "--output-dir", str(out), "--overwrite")
        one_line_error(second, "in use by another profit-ds run (pid ")
        assert str(first.pid) in second.stderr
    finally:
        first.kill()
        first.wait()
    third = profit_ds("run", *SMALL, "--output-dir", str(out), "--overwrite")
    assert third.returncode == 0, third.stderr[-2000:]


# --------------------------------------------------------------------------- 4. data text
def test_the_manifest_hash_covers_the_instances_text():
    def tasks(output: str) -> list[Task]:
        return [Task(name=f"t{i}", definition="d", categories=("c",), source="test",
                     instances=[Instance(id=f"t{i}-{j}", input=f"in {j}",
                                         outputs=(output if j == 3 else f"out {j}",))
                                for j in range(6)]) for i in range(8)]
    spec = PartitionSpec(num_clients=8)
    assert build_partition(tasks("out 3"), spec).manifest_hash != build_partition(
        tasks("EDITED out 3"), spec).manifest_hash
    assert to_example  # the text hashed is the example's (format.to_example)


# --------------------------------------------------------------------------- 5. non-finite
@pytest.mark.parametrize("flag", [["--client-lr", "nan"], ["--client-lr", "inf"],
                                  ["--personalize-lrs", "1,nan"], ["--client-lr", "1e39"]])
def test_non_finite_settings_are_refused_at_validation(flag):
    one_line_error(profit_ds("run", *flag, timeout=120), flag[0])


def test_training_that_overflows_is_recorded_as_diverged(tmp_path):
    out = tmp_path / "run"
    result = profit_ds("run", *SMALL, "--client-opt", "sgd", "--client-lr", "1e30",
                       "--output-dir", str(out))
    assert result.returncode == 2, result.stderr[-2000:]
    error = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "diverged: federated training round 1" in error[0], error
    assert "--client-lr 1e+30" in error[0]  # the setting that did it
    results = json.loads((out / "results.json").read_text())  # strict JSON: no NaN, no inf
    assert results["global"] is None and results["diverged"][0]["round"] == 1
    assert "Infinity" not in (out / "results.json").read_text()


def test_a_personalization_pair_that_diverges_is_recorded_and_left_out(monkeypatch, backbone):
    """A NaN loss for one (client, lr) pair: that pair is recorded as diverged at its epoch,
    keeps its last finite prompt and is not scored; the other pairs go on unchanged."""
    from profit_ds.evaluation.generate import evaluate
    from profit_ds.fl import local
    from profit_ds.fl.clients import ClientData, EvalSet
    from profit_ds.fl.optim import ClientOptimizer
    from profit_ds.fl.personalize import PersonalizeSpec, personalize, summarize
    from profit_ds.model.prompted import Encoded

    rows = [Encoded((5, 6, 7, 8), (9, 2)), Encoded((5, 7, 8), (10, 2))]
    test = EvalSet(rows, [("a",), ("b",)], ["x-0", "x-1"])
    clients = [ClientData(f"c{i}", "test", rows, test) for i in range(2)]
    real = local.mean_loss_gradients

    def poisoned(bb, bank, rows_, n, adapter):
        grads, losses = real(bb, bank, rows_, n, adapter)
        if bank["prompt"].shape[0] == 4:  # pairs (c0, 1), (c0, 2), (c1, 1), (c1, 2): poison (c1, 1)
            losses[2] = float("nan")
        return grads, losses
    monkeypatch.setattr(local, "mean_loss_gradients", poisoned)
    prompt = {"prompt": torch.zeros(3, backbone.hidden_size)}
    spec = PersonalizeSpec(ClientOptimizer("sgd"), [1.0, 2.0], 2, 2, 0)
    records, prompts = personalize(
        backbone, prompt, clients, test, spec, 4,
        lambda bank, req, tags=(): evaluate(backbone, bank, req, 2, 8))
    bad = [r for r in records if "diverged" in r]
    assert [(r["client"], r["lr"], r["epoch"]) for r in bad] == [("c1", 1.0, 1)]
    assert "personalization client c1 (lr 1, epoch 1)" in bad[0]["diverged"]["message"]
    assert torch.equal(prompts["c1"][(1.0, 0.0)]["prompt"], prompt["prompt"])  # the start
    scored = {(r["client"], r["lr"], r["epoch"]) for r in records if "diverged" not in r}
    assert scored == {("c0", 1.0, 1), ("c0", 1.0, 2), ("c0", 2.0, 1), ("c0", 2.0, 2),
                      ("c1", 2.0, 1), ("c1", 2.0, 2)}
    means = {(m["lr"], m["epoch"]): m["clients"] for m in summarize(records)}
    assert means == {(1.0, 1): 1, (1.0, 2): 1, (2.0, 1): 2, (2.0, 2): 2}


# --------------------------------------------------------------------------- 6. one line each
def _sni_task(name: str) -> dict:
    return {"Definition": ["Copy."], "Categories": ["Copying"], "Input_language": ["English"],
            "Output_language": ["English"],
            "Instances": [{"id": f"{name}-{i}", "input": f"w{i}", "output": [f"w{i}"]}
                          for i in range(4)]}


@pytest.mark.parametrize("case, needle", [
    ("dangling", "a symlink to nothing readable"), ("loop", "a symlink to nothing readable"),
    ("directory", "is a directory"), ("deep", "nested too deep")])
def test_bad_files_in_data_are_one_line(tmp_path, case, needle):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "task1_ok.json").write_text(json.dumps(_sni_task("task1_ok")))
    bad = tasks / "task2_bad.json"
    if case == "dangling":
        bad.symlink_to(tmp_path / "missing.json")
    elif case == "loop":
        bad.symlink_to(bad)
    elif case == "directory":
        bad.mkdir()
    else:
        bad.write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(profit_ds("data", "--data", str(tasks), "--json", timeout=120), needle)


def test_score_refuses_non_utf8_and_config_refuses_boolean_keys(tmp_path):
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"prediction": "\xff\xfe", "references": ["a"]}\n')
    one_line_error(profit_ds("score", str(bad), timeout=60), "not UTF-8")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("yes: 3\n")
    one_line_error(profit_ds("run", "--config", str(cfg), timeout=60), "quote it")


def test_pickled_weights_are_refused_without_running_their_code(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from profit_ds.model.builtin import BUILTIN_DIR

    model = tmp_path / "m"
    cfg = LlamaConfig(vocab_size=1010, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    cfg.save_pretrained(model)
    for f in BUILTIN_DIR.glob("tokenizer*"):
        (model / f.name).write_bytes(f.read_bytes())
    state = dict(LlamaForCausalLM(cfg).state_dict())
    state["payload"] = _Payload(tmp_path / "RAN")
    torch.save(state, model / "pytorch_model.bin")
    result = profit_ds("run", "--model", str(model), "--output-dir", str(tmp_path / "o"),
                       "--max-source-tokens", "64", "--max-target-tokens", "16")
    one_line_error(result, "pickle")
    assert not (tmp_path / "RAN").exists()


class _Payload:
    """Unpickling this would create a file: proof that code from the weights ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.5])
def test_ctrl_c_during_start_up_is_one_line(delay, tmp_path):
    """At any moment of start-up (the CLI's imports, Typer building the command, the lazy
    imports of torch and transformers), Ctrl-C ends the run: exit 130, one line, nothing run."""
    out = tmp_path / "never-written"
    proc = subprocess.Popen([sys.executable, "-m", "profit_ds", "run", "--output-dir", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.strip().splitlines()[-1].startswith("interrupted"), err
    assert "Traceback" not in err and not (out / "checkpoints").exists()


_SELF_INTERRUPTING = """
import os, signal, sys, time
from profit_ds import stops
stops.install()
sys.path.insert(0, sys.argv[1])
try:
    {trigger}
    print("finished", flush=True)
    time.sleep(5)
    print("not stopped", flush=True)
except KeyboardInterrupt:
    print("stopped", flush=True)
"""


@pytest.mark.parametrize("trigger", ["import slow_module", "Finalized(); time.sleep(0)"])
def test_a_stop_inside_an_import_or_finalizer_is_raised_after_it(trigger, tmp_path):
    """Ctrl-C that lands inside an import or a `__del__` (where Python would print and ignore
    it) is raised once that code is done: the import completes and the program stops."""
    (tmp_path / "slow_module.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(0.3)\n"
        "print('imported', flush=True)\n")
    finalizer = ("class Finalized:\n    def __del__(self):\n"
                 "        os.kill(os.getpid(), signal.SIGINT)\n        time.sleep(0.3)\n"
                 "        print('finalized', flush=True)\n")
    script = _SELF_INTERRUPTING.replace("try:", finalizer + "try:").format(trigger=trigger)
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    lines = res.stdout.split()
    assert lines[0] in ("imported", "finalized") and "stopped" in lines, (res.stdout, res.stderr)
    assert "not stopped" not in res.stdout and "Exception ignored" not in res.stderr


def test_a_hung_import_stays_stoppable(tmp_path):
    """A stop deferred inside an import is raised there once `DEFER_MAX_S` has passed."""
    (tmp_path / "hung_module.py").write_text(
        "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(60)\n")
    script = _SELF_INTERRUPTING.replace("stops.install()",
                                        "stops.install(); stops.DEFER_MAX_S = 0.5"
                                        ).format(trigger="import hung_module")
    start = time.monotonic()
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert res.stdout.split() == ["stopped"], (res.stdout, res.stderr)
    assert time.monotonic() - start < 30


# --------------------------------------------------------------------------- 7. tidiness
def test_sigterm_says_how_to_resume_and_leaves_nothing_behind(tmp_path):
    out, tmp = tmp_path / "run", tmp_path / "tmpdir"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "profit_ds", "run", *SMALL, "--rounds", "40",
                             "--output-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("ckpt-*")) and time.time() < deadline:
        time.sleep(0.2)
    (out / ".stale.json.abc.tmp").write_text("left by a killed write")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert f"profit-ds run --resume --output-dir {out}" in err
    resumed = profit_ds("run", *SMALL, "--rounds", "40", "--output-dir", str(out), "--resume",
                        timeout=600, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (out / ".stale.json.abc.tmp").exists()  # the run that owns the folder tidied
    assert list(tmp.iterdir()) == []  # nothing left in the system temp directory


def test_duplicate_instance_ids_are_refused(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("task1_a", "task2_b"):
        task = _sni_task(name)
        for inst in task["Instances"]:
            inst["id"] = inst["id"].replace(name, "same")
        (tasks / f"{name}.json").write_text(json.dumps(task))
    one_line_error(profit_ds("data", "--data", str(tasks), "--num-clients", "2",
                             "--clients-per-round", "1", "--validation-fraction", "0",
                             "--test-fraction", "0.5", "--json", timeout=120), "appears twice")
