"""`profit-ds run`: federated prompt tuning, personalization and ROUGE-L evaluation."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

import typer

from profit_ds.cli import app
from profit_ds.config import resolve
from profit_ds.errors import UsageError


def _lrs(text: Optional[str]) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--personalize-lrs {text}: expected comma-separated numbers") from None


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
def run(
    model: Optional[str] = typer.Option(None, help="Backbone: 'tiny' (built-in, default), an alias such as llama-7b, an HF id or a local path."),
    data: Optional[str] = typer.Option(None, help="'builtin' (default), a directory of SNI task JSON files / a natural-instructions clone, or hf:NAME."),
    heterogeneity: Optional[str] = typer.Option(None, help="task (default) | iid | categories:K | dirichlet:ALPHA"),
    num_clients: Optional[int] = typer.Option(None, help="Number of clients (default 48; with --heterogeneity task and more clients than tasks, tasks are shared)."),
    validation_fraction: Optional[float] = typer.Option(None, help="Share of clients that are validation clients (default 1/6)."),
    test_fraction: Optional[float] = typer.Option(None, help="Share of clients that are test clients (default 1/6)."),
    language: Optional[str] = typer.Option(None, help="SNI: keep tasks whose input/output language is this (default English; 'any' keeps all)."),
    positive_examples: Optional[int] = typer.Option(None, help="Demonstrations (Positive Examples) in each source text (default 0)."),
    algo: Optional[str] = typer.Option(None, help="fedavg (default) | fedsgd"),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds (default 15)."),
    clients_per_round: Optional[int] = typer.Option(None, help="Clients sampled per round (default 12)."),
    local_epochs: Optional[int] = typer.Option(None, help="FedAvg local epochs (default 2)."),
    batch_size: Optional[int] = typer.Option(None, help="Examples per client per local step (default 8)."),
    client_opt: Optional[str] = typer.Option(None, help="Client optimizer: adam (default) | sgd"),
    client_lr: Optional[float] = typer.Option(None, help="Client learning rate (default 0.1)."),
    server_opt: Optional[str] = typer.Option(None, help="Server optimizer: sgd (default) | adam | yogi | adagrad"),
    server_lr: Optional[float] = typer.Option(None, help="Server learning rate (default 1.0: plain averaging with sgd)."),
    prompt_tokens: Optional[int] = typer.Option(None, help="Virtual tokens P (default 20 built-in, 100 otherwise)."),
    prompt_init: Optional[str] = typer.Option(None, help="vocab (default) | random"),
    personalize_opt: Optional[str] = typer.Option(None, help="Personalization optimizer: sgd (default) | adam"),
    personalize_lrs: Optional[str] = typer.Option(None, help="Comma-separated lr grid (default 1,30,300: prompt gradients of the tiny model are small; retune for real backbones)."),
    personalize_epochs: Optional[int] = typer.Option(None, help="Personalization epochs (default 3)."),
    eval_every: Optional[int] = typer.Option(None, help="Score the global validation set every N rounds (0: never)."),
    eval_batch_size: Optional[int] = typer.Option(None, help="Rows per generation batch per rank."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation length (default: longest reference + 1)."),
    instances_per_task: Optional[int] = typer.Option(None, help="Built-in suite: instances per task (default 80)."),
    max_per_client: Optional[int] = typer.Option(None, help="Cap on instances per client."),
    max_source_tokens: Optional[int] = typer.Option(None, help="Truncate source texts to this many tokens (default 256; the middle goes first)."),
    max_target_tokens: Optional[int] = typer.Option(None, help="Truncate training targets to this many tokens (default 64)."),
    dtype: Optional[str] = typer.Option(None, help="Backbone dtype: fp32 (default) | bf16 (prompts stay fp32)."),
    clients_in_parallel: Optional[str] = typer.Option(None, help="K clients per batched step, or auto (default)."),
    num_procs: Optional[int] = typer.Option(None, help="Ranks on this machine (default 1)."),
    ds_config: Optional[str] = typer.Option(None, help="DeepSpeed ZeRO-3 JSON config overriding the default."),
    trust_remote_code: Optional[bool] = typer.Option(None, "--trust-remote-code", help="Allow model repos to run their own code."),
    seed: Optional[int] = typer.Option(None, help="Seed for partitions, sampling, shuffles and prompt init."),
    output_dir: Optional[str] = typer.Option(None, help="Where results go (default runs/default)."),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help="Replace a finished run in --output-dir."),
    resume: Optional[bool] = typer.Option(None, "--resume", help="Continue the unfinished run in --output-dir from its last checkpoint."),
    config: Optional[str] = typer.Option(None, help="YAML/JSON file of options; flags override it."),
) -> None:
    """Federated prompt tuning + personalization + local/global ROUGE-L, on a frozen ZeRO-3 backbone."""
    overrides = {k: v for k, v in locals().items() if k != "config"}
    overrides["personalize_lrs"] = _lrs(personalize_lrs)
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
