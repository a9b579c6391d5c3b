"""What a new user meets first, tried as they would, in fresh processes: usage errors, start-up
time, the DeepSpeed launcher, a stale JIT-build lock, piped logs, and `data` previewing the
partition `run` builds (issue 16)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from profit_ds.report import Reporter

SMALL_RUN = ["--rounds", "2", "--clients-per-round", "4", "--personalize-epochs", "1",
             "--personalize-lrs", "1", "--eval-every", "0", "--num-clients", "12",
             "--instances-per-task", "16"]


def profit_ds(*args: str, env: dict | None = None, timeout: float = 300,
              cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`profit-ds ARGS` in a fresh process, as a user's shell runs it (output piped)."""
    return subprocess.run([sys.executable, "-m", "profit_ds", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=cwd)


def stale_lock_env(tmp_path: Path) -> dict:
    """A torch extensions cache holding the lock a build killed half-way leaves behind (every
    later build of that op waits on it forever), and no C++ compiler."""
    cache = tmp_path / "torch_extensions"
    for where in (cache / "deepspeed_shm_comm", cache / "py311_cpu" / "deepspeed_shm_comm"):
        where.mkdir(parents=True)
        (where / "lock").touch()
    return {"TORCH_EXTENSIONS_DIR": str(cache), "CXX": "/bin/false", "CC": "/bin/false"}


@pytest.mark.parametrize("args, expected", [
    (["run", "--round", "2"], "No such option: --round"),
    (["run", "--rounds", "abc"], "'--rounds'"),
    (["raun"], "No such command 'raun'"),
    (["export"], "Missing argument"),
    (["run", "--personalize-lrs", "1,x"], "--personalize-lrs 1,x"),
    (["run", "--client-lr", "nan"], "--client-lr must be a finite number"),
])
def test_usage_errors_are_one_line_and_exit_2(args, expected):
    result = profit_ds(*args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_help_starts_faster_than_importing_torch():
    """`profit-ds --help` must not pay for torch, transformers or DeepSpeed: compared with
    importing torch alone in the same test (best of 3 each, so a busy machine hurts both)."""
    def best(cmd: list[str]) -> float:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            times.append(time.perf_counter() - t)
        return min(times)

    torch_s = best([sys.executable, "-c", "import torch"])
    help_s = best([sys.executable, "-m", "profit_ds", "--help"])
    models_s = best([sys.executable, "-m", "profit_ds", "models", "--json"])
    assert help_s < torch_s and models_s < torch_s, (help_s, models_s, torch_s)


def test_one_rank_run_builds_nothing_logs_plainly_and_data_previews_it(tmp_path):
    """One rank: no JIT build at all (a planted stale lock and no compiler do not matter);
    piped progress is plain lines, also in run.log; stdout holds only the tables; and
    `profit-ds data` with the same flags reports the run's own manifest hash."""
    env = stale_lock_env(tmp_path)
    out = tmp_path / "run"
    result = profit_ds("run", *SMALL_RUN, "--output-dir", str(out), env=env)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in Path(env["TORCH_EXTENSIONS_DIR"]).rglob("*")
                  if p.is_file()) == ["lock", "lock"]  # nothing built next to the locks
    for phase in ("scoring the initial prompt: 0/", "federated training: 1/2 (50%) | round 1/2",
                  "federated training: 2/2 (100%) | round 2/2", "personalization: "):
        assert phase in result.stderr, result.stderr
    assert "━" not in result.stderr  # no progress bar drawn into a pipe
    # personalization counts its training steps too, so its progress reaches its total
    assert re.search(r"personalization: (\d+)/\1 \(100%\)", result.stderr), result.stderr
    log = (out / "run.log").read_text()
    assert "federated training: 1/2 (50%) | round 1/2" in log and "local ROUGE-L" in log
    assert "DeepSpeed" not in result.stdout and "federated training" not in result.stdout
    assert "Federated prompt: ROUGE-L" in result.stdout

    data_flags = ["--clients-per-round", "4", "--num-clients", "12", "--instances-per-task",
                  "16"]
    preview = profit_ds("data", *data_flags, "--json", timeout=120)
    assert preview.returncode == 0, preview.stderr
    results = json.loads((out / "results.json").read_text())
    summary = json.loads(preview.stdout)
    assert summary["manifest_hash"] == results["data"]["manifest_hash"]
    assert summary["clients"] == {k: results["data"][f"{k}_clients"]
                                  for k in ("train", "validation", "test")}


def test_deepspeed_launcher_line_runs_two_cpu_ranks(tmp_path):
    """The README's launcher form, `deepspeed --num_gpus N --module profit_ds run ...`, on 2
    CPU ranks (gloo), with a stale build lock planted and no compiler: it finishes."""
    env = stale_lock_env(tmp_path)
    out = tmp_path / "run"
    result = subprocess.run(["deepspeed", "--num_gpus", "2", "--module", "profit_ds", "run",
                             *SMALL_RUN, "--output-dir", str(out)], capture_output=True,
                            text=True, timeout=600, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["world_size"] == 2
    assert result.stderr.count("profit-ds  backbone") == 1  # only rank 0 reports


def test_plain_progress_lines_at_least_every_heartbeat(tmp_path):
    """Piped output gets a line per status change and a heartbeat while nothing changes."""
    import io

    from rich.console import Console

    stream = io.StringIO()
    reporter = Reporter(console=Console(file=stream, width=200), log=tmp_path / "run.log",
                        heartbeat_s=0.2)
    with reporter.task("federated training", 3) as advance:
        advance(1, "round 1/3 loss 1.000")
        time.sleep(0.7)  # a long round: heartbeats
        advance(1, "round 2/3 loss 0.500")
        advance(1, "round 3/3 loss 0.250")
    lines = stream.getvalue().splitlines()
    assert any("1/3 (33%) | round 1/3 loss 1.000" in line for line in lines)
    assert sum("1/3 (33%)" in line for line in lines) >= 3  # the change, then heartbeats
    assert lines[-1].startswith("federated training: 3/3 (100%) | round 3/3 loss 0.250")
    assert sum(line.startswith("federated training: 3/3") for line in lines) == 1
    assert len((tmp_path / "run.log").read_text().splitlines()) == len(lines)
