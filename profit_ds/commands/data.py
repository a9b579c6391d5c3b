"""`profit-ds data`: build the federated partition a run would use, and summarize it.

Why a separate command: checking a partition (how many clients per split, how heterogeneous,
its manifest hash) should not need a model or a training run.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from profit_ds.cli import app, config_options
from profit_ds.config import DATA_FIELDS, resolve

if TYPE_CHECKING:
    from profit_ds.data.partition import PartitionSpec
    from profit_ds.data.types import Partition, Task


def summarize(tasks: list[Task], partition: Partition) -> dict:
    """The numbers `data` reports, as one JSON-ready dict."""
    from profit_ds.data.partition import all_clients, category_entropy, mean_client_category_entropy

    clients = all_clients(partition)
    examples = [e for c in clients for e in c.train + c.test]
    splits = {"train": partition.train_clients, "validation": partition.validation_clients,
              "test": partition.test_clients}
    return {
        "loaded": {"tasks": len(tasks), "categories": len({t.category for t in tasks}),
                   "instances": sum(len(t.instances) for t in tasks)},
        "partition": {"tasks": len({e.task for e in examples}),
                      "categories": len({e.category for e in examples}),
                      "instances": len(examples)},
        "clients": {name: len(group) for name, group in splits.items()},
        "examples": {name: {"train": sum(len(c.train) for c in group),
                            "test": sum(len(c.test) for c in group)}
                     for name, group in splits.items()},
        "global_test": len(partition.global_test),
        "global_validation": len(partition.global_validation),
        "mean_client_category_entropy": mean_client_category_entropy(partition),
        "global_category_entropy": category_entropy(examples),
        "manifest_hash": partition.manifest_hash,
    }


def _print_summary(data: str, spec: PartitionSpec, summary: dict) -> None:
    """Rich tables: clients and examples per split, then corpus and heterogeneity figures."""
    console = Console()
    splits = Table(title=f"Partition of {data} ({spec.heterogeneity}, seed {spec.seed})")
    for col in ("split", "clients", "train examples", "test examples"):
        splits.add_column(col, justify="left" if col == "split" else "right")
    for name, count in summary["clients"].items():
        ex = summary["examples"][name]
        splits.add_row(name, str(count), str(ex["train"]), str(ex["test"]))
    console.print(splits)
    facts = Table(show_header=False)
    facts.add_column("what")
    facts.add_column("value", justify="right")
    loaded, used = summary["loaded"], summary["partition"]
    for label, key in (("tasks", "tasks"), ("categories", "categories"),
                       ("instances", "instances")):
        facts.add_row(f"{label} (partition / loaded)", f"{used[key]} / {loaded[key]}")
    facts.add_row("global test / validation examples",
                  f"{summary['global_test']} / {summary['global_validation']}")
    facts.add_row("category entropy, mean per client (bits)",
                  f"{summary['mean_client_category_entropy']:.3f}")
    facts.add_row("category entropy, all examples (bits)",
                  f"{summary['global_category_entropy']:.3f}")
    console.print(facts)
    console.print(f"manifest sha256 {summary['manifest_hash']}", soft_wrap=True)


@app.command()
@config_options(DATA_FIELDS)
def data(
    overrides: dict,
    config: Optional[str] = typer.Option(None, help="YAML/JSON file of run options (as for "
                                                    "`profit-ds run --config`); flags override "
                                                    "it."),
    save_manifest: Optional[Path] = typer.Option(None, "--save-manifest",
                                                 help="Write the manifest (instance ids per "
                                                      "client) here."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
) -> None:
    """Build the partition `profit-ds run` would build with the same options (the same
    manifest hash) and summarize it: clients per split, tasks, categories, instances,
    heterogeneity (mean per-client category entropy) and the manifest hash."""
    from profit_ds.data.for_run import load_tasks, partition_of, partition_spec, sampling_problem

    cfg = resolve(config, overrides)
    tasks = load_tasks(cfg)
    partition = partition_of(cfg, tasks)
    problem = sampling_problem(cfg, partition)
    if problem:  # a preview still shows the partition; `run` would refuse it
        print(f"warning: `profit-ds run` would refuse this: {problem}", file=sys.stderr)
    if save_manifest is not None:
        save_manifest.write_text(json.dumps({"hash": partition.manifest_hash,
                                             **partition.manifest}, indent=1))
    summary = {"data": cfg.data, "heterogeneity": cfg.heterogeneity, "seed": cfg.seed,
               **summarize(tasks, partition)}
    if as_json:
        print(json.dumps(summary))
    else:
        _print_summary(cfg.data, partition_spec(cfg), summary)
