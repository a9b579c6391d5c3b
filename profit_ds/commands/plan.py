"""`profit-ds plan`: per-GPU memory of a run and the K / offload that fit, before any download.

Why a command: a 7B-70B job that dies of OOM after an hour of downloading and sharding is the
costliest mistake on a cluster; the numbers that decide it are all in the model's config.
"""
from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from profit_ds import plan as planning
from profit_ds.cli import app
from profit_ds.commands.models import human_params
from profit_ds.model.ds_config import uses_zero3

GB = planning.GB


def _facts_table(result: planning.Plan) -> Table:
    """What the estimate rests on: the model's sizes and one step's workload."""
    shape, work = result.shape, result.workload
    table = Table(show_header=False, title=f"{shape.name} on {work.gpus} GPU(s) x "
                                           f"{work.nodes} node(s)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{human_params(shape.params)} ({shape.params:,})")
    table.add_row("bf16 weights, whole model", f"{planning.BF16 * shape.params / GB:.2f} GB")
    table.add_row("hidden / intermediate / layers / vocab",
                  f"{shape.hidden_size} / {shape.intermediate_size} / {shape.num_layers} / "
                  f"{shape.vocab_size}")
    table.add_row("decoder layer / largest module (params)",
                  f"{human_params(shape.decoder_layer_params)} / "
                  f"{human_params(shape.largest_module_params)}")
    table.add_row("tokens per row (prompt + sequence)" if work.prompt_tokens else
                  "tokens per row (extra positions + sequence)",
                  f"{work.prompt_tokens} + {work.seq_len}")
    table.add_row("rows per step (K clients x micro batch)",
                  f"{result.clients_in_parallel} x {work.micro_batch}, split over "
                  f"{work.world} GPU(s)")
    b = result.budgets
    table.add_row("run's budgets per GPU: memory / tokens per forward / generation rows, "
                  "positions", f"{b.memory / GB:.2f} GB / {b.tokens_per_forward} / "
                  f"{b.generation_rows}, {b.generation_tokens}")
    table.add_row("activation checkpointing", "on" if b.checkpointing else "off")
    return table


def _memory_table(result: planning.Plan) -> Table:
    """The per-GPU budget, term by term, against the usable part of the GPU."""
    mem = result.memory
    table = Table(title=f"Per-GPU memory ({result.ds_config})")
    table.add_column("term")
    table.add_column("GB", justify="right")
    if result.offload:
        shard = "in CPU RAM (offload)"
    elif uses_zero3(result.workload.world, result.offload):
        shard = "ZeRO-3 shard"
    else:
        shard = "whole model (one rank: no ZeRO-3)"
    for label, value in ((f"weights: {shard}", mem.weights),
                         ("gathered layers + persistent params", mem.gathered),
                         ("activations: one forward or generation batch", mem.activations),
                         ("client states + grad + Adam (fp32)", mem.prompts),
                         ("CUDA context, run's reserve", mem.runtime)):
        table.add_row(label, f"{value / GB:.2f}")
    table.add_row("total", f"{mem.total / GB:.2f}", style="bold")
    table.add_row("GPU memory", f"{result.gpu_mem_bytes / GB:.2f}")
    table.add_row("DeepSpeed estimator (weights + largest layer)",
                  f"{result.deepspeed_estimate / GB:.2f}", style="dim")
    return table


def verdict(result: planning.Plan) -> str:
    """One sentence: what to run with, or what to change."""
    if not result.fits:
        return ("Does not fit: not even one row of --seq-len tokens with parameter offload and "
                "activation checkpointing; lower --seq-len, or add GPUs.")
    offload = (f"parameter offload needed ({result.cpu_offload_bytes_per_node / GB:.0f} GB "
               "pinned CPU RAM per node)" if result.offload else "no offload needed")
    return (f"Recommended: --ds-config {result.ds_config}; the run's K=auto is "
            f"{result.clients_in_parallel} ({offload}; K=auto fills one forward of "
            f"{result.budgets.tokens_per_forward} tokens per GPU, a larger K only adds forwards, "
            "and a run uses at most its clients per round).")


@app.command()
def plan(
    model: str = typer.Option(..., "--model", help="Alias (profit-ds models), HF id or local "
                                                  "path; only its config is read."),
    gpus: int = typer.Option(1, "--gpus", help="GPUs per node."),
    nodes: int = typer.Option(1, "--nodes", help="Nodes."),
    prompt_tokens: int | None = typer.Option(None, "--prompt-tokens",
                                                help="Virtual tokens P (default: as run)."),
    adapter: str = typer.Option("prompt", "--adapter", help="prompt | lora: what each "
                                                            "client trains."),
    lora_rank: int = typer.Option(8, "--lora-rank", help="--adapter lora: the rank r."),
    lora_targets: str = typer.Option("q_proj,v_proj", "--lora-targets",
                                     help="--adapter lora: the linear layers adapted."),
    clients_in_parallel: int | None = typer.Option(
        None, "--clients-in-parallel", help="K to check (default: the run's K=auto)."),
    seq_len: int | None = typer.Option(None, "--seq-len",
                                          help="Source + target tokens per row (default: as "
                                               "run's token limits)."),
    micro_batch: int | None = typer.Option(None, "--micro-batch",
                                              help="Rows per client per step (run's "
                                                   "--batch-size)."),
    gpu_mem_gb: float = typer.Option(80.0, "--gpu-mem-gb", help="Memory of one GPU, GB."),
    ds_config: str | None = typer.Option(None, "--ds-config",
                                            help="Plan for this ZeRO-3 config instead of "
                                                 "choosing between the bundled ones."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Estimate per-GPU memory for a frozen ZeRO-3 backbone and recommend K and offload."""
    work = planning.default_workload(model, gpus, nodes, prompt_tokens, seq_len, micro_batch,
                                     {"adapter": adapter, "lora_rank": lora_rank,
                                      "lora_targets": lora_targets})
    result = planning.plan(planning.model_shape(model), work, gpu_mem_gb,
                           clients_in_parallel, ds_config)
    if as_json:
        print(json.dumps({**result.to_dict(), "verdict": verdict(result)}))
        return
    console = Console()
    console.print(_facts_table(result))
    console.print(_memory_table(result))
    console.print(verdict(result))
