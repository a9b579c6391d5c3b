"""`profit-ds run`: federated prompt tuning, personalization and ROUGE-L evaluation."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import fields
from typing import Optional

import typer

from profit_ds.cli import app, config_options
from profit_ds.config import RunConfig, resolve
from profit_ds.errors import Terminated, UsageError


def launch_local_ranks(num_procs: int) -> int:
    """Re-run this command as `num_procs` SPMD ranks on this machine (what `deepspeed
    --num_gpus N` does), streaming rank 0's output; returns the worst exit code."""
    from profit_ds.distributed import _free_port

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--num-procs="):
            skip = False
            continue
        if arg == "--num-procs":
            skip = True
            continue
        argv.append(arg)
    port = str(_free_port())
    procs = []
    for r in range(num_procs):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(num_procs),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        quiet = {} if r == 0 else {"stdout": subprocess.DEVNULL}
        procs.append(subprocess.Popen([sys.executable, "-m", "profit_ds", *argv], env=env, **quiet))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt as stop:  # pass Ctrl-C / SIGTERM on to the ranks, let them stop
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
        codes = [p.wait() for p in procs]
        raise SystemExit(getattr(stop, "exit_code", 130)) from None
    return max(codes, key=abs)


@app.command()
@config_options([f.name for f in fields(RunConfig)])
def run(overrides: dict,
        config: Optional[str] = typer.Option(None, help="YAML/JSON file of options; flags "
                                                        "override it.")) -> None:
    """Federated prompt tuning + personalization + local/global ROUGE-L, on a frozen ZeRO-3 backbone."""
    cfg = resolve(config, overrides)
    if cfg.num_procs > 1 and "WORLD_SIZE" not in os.environ:
        code = launch_local_ranks(cfg.num_procs)
        if code:
            raise typer.Exit(code)
        return
    from profit_ds.runner import run as run_pipeline

    try:
        results = run_pipeline(cfg)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (errors.Terminated)
        # checkpoints are written after every round and personalization group
        print(f"interrupted; continue with: profit-ds run --resume --output-dir {cfg.output_dir}",
              file=sys.stderr)
        raise SystemExit(getattr(stop, "exit_code", 130)) from None
    if results.get("global") is None and results.get("diverged"):
        raise UsageError(f"{results['diverged'][0]['message']}; recorded in "
                         f"{cfg.output_dir}/results.json (lower the learning rate)")
