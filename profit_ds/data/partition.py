"""Federated partitions: which instances each client holds, and the pooled global sets.

Deterministic under `seed`: every random choice draws from one `random.Random(seed)` in a fixed
order, so the same tasks + spec give the same manifest (and manifest hash) on any machine.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass

from profit_ds.data.format import FormatSpec, to_example
from profit_ds.data.types import Client, Example, Instance, Partition, Task
from profit_ds.errors import UsageError


@dataclass(frozen=True)
class PartitionSpec:
    """How to cut tasks into clients.

    heterogeneity: "task" (one client per task) or "iid" (every client draws from all tasks).
    num_clients: number of clients (None: one per task).
    validation_fraction / test_fraction: share of clients that are validation / test clients;
    the rest train.
    client_test_fraction: share of each client's instances held out as its local test set.
    max_instances: cap on instances in the whole partition (the paper card's 10,000).
    max_per_client: cap on instances per client (None: no cap).
    """

    heterogeneity: str = "task"
    num_clients: int | None = None
    validation_fraction: float = 1 / 6
    test_fraction: float = 1 / 3
    client_test_fraction: float = 0.2
    max_instances: int = 10_000
    max_per_client: int | None = None
    seed: int = 0


def _client_instances(tasks: list[Task], spec: PartitionSpec,
                      rng: random.Random) -> list[list[tuple[Task, Instance]]]:
    if spec.heterogeneity == "task":
        if spec.num_clients not in (None, len(tasks)):
            raise UsageError(f"--heterogeneity task makes one client per task ({len(tasks)}), "
                             f"but {spec.num_clients} clients were asked for")
        groups = [[(t, inst) for inst in t.instances] for t in tasks]
    elif spec.heterogeneity == "iid":
        pool = [(t, inst) for t in tasks for inst in t.instances]
        rng.shuffle(pool)
        n = spec.num_clients or len(tasks)
        groups = [pool[i::n] for i in range(n)]
    else:
        raise UsageError(f"--heterogeneity: unknown value {spec.heterogeneity!r} "
                         "(expected task or iid)")
    per_client_cap = spec.max_per_client or 10**12
    per_client_cap = min(per_client_cap, max(1, spec.max_instances // max(1, len(groups))))
    capped = []
    for group in groups:
        group = list(group)
        rng.shuffle(group)
        capped.append(group[:per_client_cap])
    return capped


def build_partition(tasks: list[Task], spec: PartitionSpec = PartitionSpec(),
                    fmt: FormatSpec = FormatSpec()) -> Partition:
    """Cut `tasks` into train/validation/test clients with local test sets and global sets."""
    if not tasks:
        raise UsageError("--data: no tasks to partition")
    rng = random.Random(spec.seed)
    groups = _client_instances(tasks, spec, rng)
    n = len(groups)
    n_test = max(1, round(n * spec.test_fraction))
    n_val = max(1, round(n * spec.validation_fraction)) if spec.validation_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise UsageError(f"--heterogeneity {spec.heterogeneity}: {n} clients are too few for "
                         f"{n_val} validation and {n_test} test clients plus at least one train client")
    order = list(range(n))
    rng.shuffle(order)
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[idx] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"

    clients = {"train": [], "validation": [], "test": []}
    manifest_clients = []
    for idx, group in enumerate(groups):
        n_local_test = max(1, round(len(group) * spec.client_test_fraction))
        if len(group) < 2:
            raise UsageError(f"client {idx} has {len(group)} instance(s); need at least 2 "
                             "(one to train on, one to test)")
        test_part, train_part = group[:n_local_test], group[n_local_test:]
        name = (group[0][0].name if spec.heterogeneity == "task" else f"client{idx:03d}")
        client = Client(name=name, split=split_of[idx],
                        train=[to_example(t, i, fmt) for t, i in train_part],
                        test=[to_example(t, i, fmt) for t, i in test_part])
        clients[client.split].append(client)
        manifest_clients.append({"name": name, "split": client.split,
                                 "train": [e.id for e in client.train],
                                 "test": [e.id for e in client.test]})
    global_test: list[Example] = [e for c in clients["test"] for e in c.test]
    global_validation: list[Example] = [e for c in clients["validation"] for e in c.test]
    manifest = {"spec": asdict(spec), "format": asdict(fmt), "clients": manifest_clients}
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return Partition(train_clients=clients["train"], validation_clients=clients["validation"],
                     test_clients=clients["test"], global_test=global_test,
                     global_validation=global_validation, manifest=manifest,
                     manifest_hash=digest)
