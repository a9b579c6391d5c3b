"""Exact resume: a run killed with SIGKILL (mid-training or mid-personalization) and resumed
ends with the same prompts and metrics as an uninterrupted run, for a stateless algorithm and
for SCAFFOLD (whose control variates must be restored); bad checkpoints are detected."""
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
from safetensors.torch import load_file

from conftest import UNTRAINED, flags
from profit_ds import checkpoint
from profit_ds.errors import UsageError

ROUNDS = 4


# what each resumed setting adds to the run's flags: LoRA with FedSA also checkpoints each
# client's private B
SETTINGS = {"fedavg": ["--algo", "fedavg"], "scaffold": ["--algo", "scaffold"],
            "lora-fedsa": ["--algo", "fedavg", "--adapter", "lora", "--lora-aggregation",
                           "fedsa"]}


def _args(model_dir, out, algo="fedavg"):
    return ["run", "--model", str(model_dir), *SETTINGS[algo], "--prompt-tokens", "4",
            "--rounds", str(ROUNDS),
            "--clients-per-round", "3", "--instances-per-task", "12", "--batch-size", "4",
            "--client-opt", "adam", "--server-opt", "adam", "--server-lr", "0.05",
            "--personalize-lrs", "0.5,2", "--personalize-epochs", "1",
            "--clients-in-parallel", "2", "--eval-every", "2", "--output-dir", str(out),
            *flags({k: v for k, v in UNTRAINED.items() if k != "personalize_lrs"})]


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", "profit_ds", *args], capture_output=True,
                          text=True, **kw)


def _comparable(out: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    for r in res["rounds"]:
        r.pop("seconds")
    tensors = {f"global/{k}": v for f in out.glob("global_*.safetensors")
               for k, v in load_file(f).items()}
    for f in sorted((out / "clients").glob("*.safetensors")):
        tensors.update({f"{f.stem}/{k}": v for k, v in load_file(f).items()})
    return {"rounds": res["rounds"], "initial": res["initial"], "global": res["global"],
            "personalized": res["personalized_clients"], "tensors": tensors}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    """algo -> the uninterrupted run's comparable outputs (each run once per module)."""
    runs: dict[str, dict] = {}

    def get(algo: str) -> dict:
        if algo not in runs:
            out = tmp_path_factory.mktemp(f"full-{algo}")
            res = _run(_args(tiny_model_dir, out, algo))
            assert res.returncode == 0, res.stderr[-2000:]
            runs[algo] = _comparable(out)
        return runs[algo]
    return get


def _kill_when(out: Path, args, ready) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "profit_ds", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ready(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists()


def _ckpt_seqs(out: Path) -> list[int]:
    return [int(p.stem.split("-")[1]) for p in (out / "checkpoints").glob("ckpt-*.safetensors")]


AFTER_ROUND_2 = lambda out: max(_ckpt_seqs(out), default=0) >= 3  # noqa: E731
IN_PERSONALIZATION = lambda out: max(_ckpt_seqs(out), default=0) >= ROUNDS + 3  # noqa: E731


@pytest.mark.parametrize("algo,phase,ready", [
    # personalization resumes through the same checkpoint code for either adapter: LoRA's
    # case covers it (a prompt case took 19 s of a suite kept under 15 minutes); a stateless
    # algorithm's training is LoRA-FedSA's case, a prompt's is SCAFFOLD's (which restores
    # more: control variates), so a plain FedAvg prompt case (36 s) adds no code of its own
    ("scaffold", "training", AFTER_ROUND_2),
    ("lora-fedsa", "training", AFTER_ROUND_2),
    ("lora-fedsa", "personalization", IN_PERSONALIZATION)])
def test_sigkill_then_resume_matches_uninterrupted(algo, phase, ready, tiny_model_dir, tmp_path,
                                                   uninterrupted):
    uninterrupted = uninterrupted(algo)
    out = tmp_path / phase
    args = _args(tiny_model_dir, out, algo)
    _kill_when(out, args, ready)
    res = _run(args + ["--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming after round" in res.stderr
    got = _comparable(out)
    assert got["tensors"].keys() == uninterrupted["tensors"].keys()
    for k, v in uninterrupted["tensors"].items():
        assert (got["tensors"][k] == v).all(), k
    for key in ("rounds", "initial", "global"):
        assert got[key] == uninterrupted[key], key
    # scores are identical; a record's mean training loss may differ in the 7th digit (it is a
    # forward-pass value, and the prompts above are bit-identical, so no training differs)
    for a, b in zip(got["personalized"], uninterrupted["personalized"], strict=True):
        a, b = dict(a), dict(b)  # the fixture is shared by both phases: don't mutate it
        assert a.pop("train_loss") == pytest.approx(b.pop("train_loss"), rel=1e-5)
        assert a == b


def test_corrupted_checkpoint_falls_back_to_previous(tmp_path):
    d = tmp_path / "ck"
    for r in (1, 2):
        checkpoint.save(d, checkpoint.Checkpoint(r, {"prompt": torch.full((2, 3), float(r))},
                                                 {"rounds": [r]}), "cfg", "data")
    newest = max(d.glob("ckpt-*.safetensors"))
    newest.write_bytes(newest.read_bytes()[:-7])  # truncated
    warnings = []
    ck = checkpoint.load_latest(d, "cfg", "data", warn=warnings.append)
    assert ck.round == 1 and ck.state == {"rounds": [1]}
    assert "corrupted" in warnings[0] and newest.name in warnings[0]


def test_flipped_byte_is_detected_by_hash(tmp_path):
    d = tmp_path / "ck"
    checkpoint.save(d, checkpoint.Checkpoint(1, {"prompt": torch.ones(4)}, {}), "cfg", "data")
    path = next(d.glob("ckpt-*.safetensors"))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    warnings = []
    with pytest.raises(UsageError, match="verifies"):
        checkpoint.load_latest(d, "cfg", "data", warn=warnings.append)
    assert "SHA-256" in warnings[0]


@pytest.mark.parametrize("field, value", [("round", "7"), ("state", '{"rounds": [9]}'),
                                          ("config_hash", "other")])
def test_edited_metadata_is_detected_by_hash(tmp_path, field, value):
    """The round, the finished state and the hashes are covered by the digest too: editing
    any of them in place (same tensors) is refused, not resumed from."""
    from safetensors.torch import load_file, save_file
    d = tmp_path / "ck"
    checkpoint.save(d, checkpoint.Checkpoint(3, {"prompt": torch.ones(4)}, {"rounds": [3]}),
                    "cfg", "data")
    path = next(d.glob("ckpt-*.safetensors"))
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    save_file(load_file(path), path, metadata={**meta, field: value})
    warnings = []
    with pytest.raises(UsageError, match="verifies"):
        checkpoint.load_latest(d, "cfg", "data", warn=warnings.append)
    assert "does not match" in warnings[0]


def test_resume_without_any_checkpoint_is_refused(tmp_path):
    (tmp_path / "ck").mkdir()
    with pytest.raises(UsageError, match="no checkpoint"):
        checkpoint.load_latest(tmp_path / "ck", "cfg", "data")


def test_a_killed_run_is_resumed_only_when_asked_and_with_its_own_config(tiny_model_dir,
                                                                         tmp_path):
    """Both refusals leave the killed run's files as they were: a plain rerun (it needs
    --resume or --overwrite) and a resume with another config."""
    out = tmp_path / "o"
    args = _args(tiny_model_dir, out)
    _kill_when(out, args, lambda o: max(_ckpt_seqs(o), default=0) >= 2)
    # the killed run's lock is the one file a refused run may touch: it takes the lock of
    # a dead run over and lets it go (run_lock), and removes the half-written temporary a
    # kill during a write leaves (`.NAME.*.tmp`, no one's: io writes by rename)
    files = lambda: {p: p.read_bytes() for p in out.rglob("*")  # noqa: E731
                     if p.is_file() and p.name != ".profit-ds.lock"
                     and not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    before = files()
    res = _run(args)
    assert res.returncode == 2 and "--resume" in res.stderr
    assert files() == before
    res = _run(args + ["--resume", "--client-lr", "0.5"])
    assert res.returncode == 2
    assert "different config" in res.stderr and "Traceback" not in res.stderr
    assert files() == before and not (out / ".profit-ds.lock").exists()
