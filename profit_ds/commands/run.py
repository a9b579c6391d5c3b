"""`profit-ds run`: federated prompt tuning, personalization and ROUGE-L evaluation."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields
from typing import Optional

import typer

from profit_ds.cli import app, config_options
from profit_ds.config import RunConfig, resolve


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
    codes = [p.wait() for p in procs]
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
        run_pipeline(cfg)
    except KeyboardInterrupt:
        # checkpoints are written after every round and personalization group
        print(f"interrupted; continue with: profit-ds run --resume --output-dir {cfg.output_dir}",
              file=sys.stderr)
        raise typer.Exit(130) from None
