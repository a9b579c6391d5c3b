"""The data a run config asks for: its tasks and its seeded partition.

One code path for `profit-ds run`, `data`, `personalize` and `sweep`, so `profit-ds data`
previews exactly the partition (and manifest hash) a run with the same options builds.
"""
from __future__ import annotations

from profit_ds.config import RunConfig
from profit_ds.data.format import FormatSpec
from profit_ds.data.loading import load_tasks as load_data
from profit_ds.data.partition import PartitionSpec, build_partition
from profit_ds.data.types import Partition, Task
from profit_ds.errors import UsageError


def load_tasks(cfg: RunConfig) -> list[Task]:
    """Tasks for `--data`: the built-in suite (`--instances-per-task` each), or SNI."""
    return load_data(cfg.data, languages=None if cfg.language == "any" else (cfg.language,),
                     builtin_instances=cfg.instances_per_task)


def partition_spec(cfg: RunConfig) -> PartitionSpec:
    """The partition options of a run config."""
    return PartitionSpec(heterogeneity=cfg.heterogeneity, num_clients=cfg.num_clients,
                         validation_fraction=cfg.validation_fraction,
                         test_fraction=cfg.test_fraction, max_per_client=cfg.max_per_client,
                         seed=cfg.seed)


def partition_of(cfg: RunConfig, tasks: list[Task]) -> Partition:
    """The run's seeded partition of `tasks`: the same clients every time (`personalize` and
    `sweep` rebuild it with this too; `profit-ds data` previews it)."""
    return build_partition(tasks, partition_spec(cfg),
                           FormatSpec(num_positive_examples=cfg.positive_examples))


def sampling_problem(cfg: RunConfig, partition: Partition) -> str | None:
    """Why a run could not sample its rounds' clients from `partition`, or None."""
    if cfg.clients_per_round > len(partition.train_clients):
        return (f"--clients-per-round {cfg.clients_per_round}: only "
                f"{len(partition.train_clients)} train clients")
    return None


def run_partition(cfg: RunConfig, tasks: list[Task]) -> Partition:
    """`partition_of`, refused (UsageError) if a run could not sample from it."""
    partition = partition_of(cfg, tasks)
    problem = sampling_problem(cfg, partition)
    if problem:
        raise UsageError(problem)
    return partition
