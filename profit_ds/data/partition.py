"""Federated partitions: which instances each client holds, and the pooled global sets.

Heterogeneity is how far a client's mix of task categories is from the global mix:
- `task`: one client per task (SNI's natural heterogeneity; with --num-clients below the number
  of tasks, that many tasks are sampled; above it, each task is shared by several clients,
  client i holding task i mod T, so test clients have tasks that train clients also hold).
- `categories:K`: each client draws from K categories, equally weighted (K = 1: every client is
  one category, the most heterogeneous split).
- `dirichlet:ALPHA`: each client's category mixture q ~ Dir(ALPHA * p), p the global category
  shares (Hsu et al. 2019): ALPHA -> 0 gives one category per client, ALPHA -> inf the global mix.
- `iid`: every client draws uniformly from all instances.

Instances are drawn without replacement, one per client in turn (round robin), so clients that
compete for a category share it evenly instead of the first client taking it all; a client whose
categories run dry stops early (`categories:K`) or falls back to its other categories
(`dirichlet`). Each client gets at most `max_instances // num_clients` (and `max_per_client`).

Deterministic under `seed`: every random choice draws from one `random.Random(seed)` in a fixed
order, so the same tasks + spec give the same manifest (and manifest hash) on any machine.
Instances are only materialized once chosen, so lazily loaded corpora stay lazy.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from profit_ds.config import HETEROGENEITY_HELP
from profit_ds.data.format import FormatSpec, to_example
from profit_ds.data.types import Client, Example, Partition, Task
from profit_ds.errors import UsageError


@dataclass(frozen=True)
class PartitionSpec:
    """How to cut tasks into clients.

    heterogeneity: "task", "iid", "categories:K" or "dirichlet:ALPHA" (see module doc).
    num_clients: number of clients (None: one per task).
    validation_fraction / test_fraction: share of clients that are validation / test clients;
    the rest train.
    client_test_fraction: share of each client's instances held out as its local test set.
    max_instances: cap on instances in the whole partition (the paper card's 10,000).
    max_per_client: cap on instances per client (None: no cap beyond the fair share).
    """

    heterogeneity: str = "task"
    num_clients: int | None = None
    validation_fraction: float = 1 / 6
    test_fraction: float = 1 / 3
    client_test_fraction: float = 0.2
    max_instances: int = 10_000
    max_per_client: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class Heterogeneity:
    """A parsed --heterogeneity value."""

    kind: str  # "task" | "iid" | "categories" | "dirichlet"
    k: int = 0
    alpha: float = 0.0


def parse_heterogeneity(text: str) -> Heterogeneity:
    """Parse "task", "iid", "categories:K" (K >= 1) or "dirichlet:ALPHA" (ALPHA > 0)."""
    kind, _, arg = text.strip().partition(":")
    if kind in ("task", "iid") and not arg:
        return Heterogeneity(kind)
    if kind == "categories" and arg.isdigit() and int(arg) >= 1:
        return Heterogeneity(kind, k=int(arg))
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            alpha = float("nan")
        if math.isfinite(alpha) and alpha > 0:
            return Heterogeneity(kind, alpha=alpha)
    raise UsageError(f"--heterogeneity: unknown value {text!r} (expected {HETEROGENEITY_HELP})")


def _check_spec(spec: PartitionSpec) -> None:
    """Reject fractions and caps that cannot make a train/validation/test split."""
    if not 0 < spec.test_fraction < 1 or not 0 <= spec.validation_fraction < 1:
        raise UsageError("test fraction must be in (0, 1) and validation fraction in [0, 1)")
    if spec.test_fraction + spec.validation_fraction >= 1:
        raise UsageError("test + validation fractions must leave some train clients (< 1)")
    if not 0 < spec.client_test_fraction < 1:
        raise UsageError("client test fraction must be in (0, 1)")
    if spec.num_clients is not None and spec.num_clients < 1:
        raise UsageError(f"--num-clients {spec.num_clients}: must be at least 1")
    if spec.max_instances < 1 or (spec.max_per_client is not None and spec.max_per_client < 2):
        raise UsageError("--max-instances must be >= 1 and --max-per-client >= 2")


# --------------------------------------------------------------------------- sampling
class _LazyShuffle:
    """Draws from range(n) without replacement, O(1) time and memory per draw.

    A Fisher-Yates shuffle whose swaps live in a dict, so a 1.6M-instance pool costs only the
    draws actually made, not a 1.6M-entry list.
    """

    def __init__(self, n: int) -> None:
        self.remaining = n
        self._swaps: dict[int, int] = {}

    def draw(self, rng: random.Random) -> int:
        j = rng.randrange(self.remaining)
        self.remaining -= 1
        value = self._swaps.get(j, j)
        self._swaps[j] = self._swaps.pop(self.remaining, self.remaining)
        return value


class _Pool:
    """The instances of some tasks (one task, one category, or all), drawn without replacement."""

    def __init__(self, tasks: list[Task], task_ids: Iterable[int]) -> None:
        self.task_ids = list(task_ids)
        self.ends = list(itertools.accumulate(len(tasks[t].instances) for t in self.task_ids))
        self.size = self.ends[-1] if self.ends else 0
        self._shuffle = _LazyShuffle(self.size)

    @property
    def remaining(self) -> int:
        return self._shuffle.remaining

    def draw(self, rng: random.Random) -> tuple[int, int]:
        """One unused instance as (task index, instance index within the task)."""
        g = self._shuffle.draw(rng)
        k = bisect.bisect_right(self.ends, g)
        return self.task_ids[k], g - (self.ends[k - 1] if k else 0)


@dataclass
class _Plan:
    """Which pools a client draws from, and with what weights (None: uniform per instance)."""

    pools: list[int]
    weights: list[float] | None = None


def _dirichlet(rng: random.Random, alpha: float, prior: list[float]) -> list[float]:
    """q ~ Dir(alpha * prior). If every gamma draw underflows (tiny alpha), the limit: one-hot."""
    draws = [rng.gammavariate(alpha * p, 1.0) for p in prior]
    total = sum(draws)
    if total > 0:
        return [d / total for d in draws]
    chosen = rng.choices(range(len(prior)), weights=prior)[0]
    return [float(i == chosen) for i in range(len(prior))]


def _plans(tasks: list[Task], het: Heterogeneity, n: int,
           rng: random.Random) -> tuple[list[_Pool], list[_Plan]]:
    """The pools instances come from and each client's plan, per heterogeneity kind."""
    if het.kind == "task":
        if n > len(tasks):
            return ([_Pool(tasks, [t]) for t in range(len(tasks))],
                    [_Plan([i % len(tasks)]) for i in range(n)])
        chosen = sorted(rng.sample(range(len(tasks)), n)) if n < len(tasks) else range(n)
        return [_Pool(tasks, [t]) for t in chosen], [_Plan([i]) for i in range(n)]
    if het.kind == "iid":
        return [_Pool(tasks, range(len(tasks)))], [_Plan([0]) for _ in range(n)]
    by_category: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        by_category.setdefault(task.category, []).append(i)
    pools = [_Pool(tasks, ids) for _, ids in sorted(by_category.items())]
    c = len(pools)
    if het.kind == "categories":
        if het.k > c:
            raise UsageError(f"--heterogeneity categories:{het.k}: the data has only {c} "
                             "categories")
        order = list(range(c))
        rng.shuffle(order)  # client i takes the next k categories: every category gets used
        return pools, [_Plan([order[(i * het.k + j) % c] for j in range(het.k)], [1.0] * het.k)
                       for i in range(n)]
    total = sum(p.size for p in pools)
    prior = [p.size / total for p in pools]
    return pools, [_Plan(list(range(c)), _dirichlet(rng, het.alpha, prior)) for _ in range(n)]


def _pick(pools: list[_Pool], plan: _Plan, rng: random.Random) -> _Pool | None:
    """The pool a client's next instance comes from; None once all its pools are dry."""
    weights = plan.weights or [0.0] * len(plan.pools)
    live = [(pools[i], w) for i, w in zip(plan.pools, weights) if pools[i].remaining]
    if not live:
        return None
    if len(live) == 1:
        return live[0][0]
    if sum(w for _, w in live) <= 0:  # uniform plan, or its weighted pools are all dry
        live = [(pool, float(pool.remaining)) for pool, _ in live]
    return rng.choices([p for p, _ in live], weights=[w for _, w in live])[0]


def _draw(pools: list[_Pool], plans: list[_Plan], quota: int,
          rng: random.Random) -> list[list[tuple[int, int]]]:
    """Round robin: each pass gives every client still drawing one more instance."""
    groups: list[list[tuple[int, int]]] = [[] for _ in plans]
    active = list(range(len(plans)))
    for _ in range(quota):
        still = []
        for c in active:
            pool = _pick(pools, plans[c], rng)
            if pool is not None:
                groups[c].append(pool.draw(rng))
                still.append(c)
        active = still
    return groups


def _client_groups(tasks: list[Task], spec: PartitionSpec,
                   rng: random.Random) -> list[list[tuple[int, int]]]:
    """(task index, instance index) pairs per client; errors instead of shrinking silently."""
    het = parse_heterogeneity(spec.heterogeneity)
    n = spec.num_clients or len(tasks)
    quota = min(spec.max_per_client or spec.max_instances, spec.max_instances // n)
    if quota < 2:
        raise UsageError(f"--num-clients {n}: a cap of {spec.max_instances} instances leaves "
                         "fewer than the 2 per client needed (one to train, one to test)")
    pools, plans = _plans(tasks, het, n, rng)
    groups = _draw(pools, plans, quota, rng)
    short = sum(len(g) < 2 for g in groups)
    if short:
        raise UsageError(f"--num-clients {n}: {short} client(s) got fewer than the 2 instances a "
                         f"client needs (one to train, one to test) under --heterogeneity "
                         f"{spec.heterogeneity}; ask for fewer clients")
    return groups


# --------------------------------------------------------------------------- partition
def _assign_splits(n: int, spec: PartitionSpec, rng: random.Random) -> list[str]:
    """Which clients are test, validation and train clients (at least one of each asked for)."""
    n_test = max(1, round(n * spec.test_fraction))
    n_val = max(1, round(n * spec.validation_fraction)) if spec.validation_fraction > 0 else 0
    if n - n_test - n_val < 1:
        raise UsageError(f"--heterogeneity {spec.heterogeneity}: {n} clients are too few for "
                         f"{n_val} validation and {n_test} test clients plus at least one train "
                         "client")
    order = list(range(n))
    rng.shuffle(order)
    split_of = [""] * n
    for rank, idx in enumerate(order):
        split_of[idx] = ("test" if rank < n_test else
                         "validation" if rank < n_test + n_val else "train")
    return split_of


def build_partition(tasks: list[Task], spec: PartitionSpec = PartitionSpec(),
                    fmt: FormatSpec = FormatSpec()) -> Partition:
    """Cut `tasks` into train/validation/test clients with local test sets and global sets."""
    if not tasks:
        raise UsageError("--data: no tasks to partition")
    _check_spec(spec)
    rng = random.Random(spec.seed)
    groups = _client_groups(tasks, spec, rng)
    split_of = _assign_splits(len(groups), spec, rng)
    width = max(3, len(str(len(groups) - 1)))
    single_task = parse_heterogeneity(spec.heterogeneity).kind == "task"
    shared = single_task and len(groups) > len(tasks)  # several clients per task

    clients: dict[str, list[Client]] = {"train": [], "validation": [], "test": []}
    manifest_clients = []
    for idx, group in enumerate(groups):
        examples = [to_example(tasks[t], tasks[t].instances[j], fmt) for t, j in group]
        n_local_test = min(len(examples) - 1,
                           max(1, round(len(examples) * spec.client_test_fraction)))
        name = (f"{examples[0].task}-part{idx // len(tasks)}" if shared else
                examples[0].task if single_task else f"client{idx:0{width}d}")
        client = Client(name=name, split=split_of[idx], train=examples[n_local_test:],
                        test=examples[:n_local_test])
        clients[client.split].append(client)
        manifest_clients.append({"name": name, "split": client.split,
                                 "categories": dict(sorted(Counter(
                                     e.category for e in examples).items())),
                                 "train": [e.id for e in client.train],
                                 "test": [e.id for e in client.test],
                                 "sha256": _text_digest(client.train + client.test)})
    _check_unique_ids(clients)
    global_test: list[Example] = [e for c in clients["test"] for e in c.test]
    global_validation: list[Example] = [e for c in clients["validation"] for e in c.test]
    manifest = {"spec": asdict(spec), "format": asdict(fmt), "clients": manifest_clients}
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return Partition(train_clients=clients["train"], validation_clients=clients["validation"],
                     test_clients=clients["test"], global_test=global_test,
                     global_validation=global_validation, manifest=manifest,
                     manifest_hash=digest)


def _check_unique_ids(clients: dict[str, list[Client]]) -> None:
    """Instance ids name examples in the manifest and the predictions files: two examples
    with one id would be one example there."""
    seen: dict[str, str] = {}
    for group in clients.values():
        for c in group:
            for e in c.train + c.test:
                if e.id in seen:
                    raise UsageError(f"--data: instance id {e.id!r} appears twice (tasks "
                                     f"{seen[e.id]} and {e.task}); ids must be unique")
                seen[e.id] = e.task


def _text_digest(examples: list[Example]) -> str:
    """SHA-256 of the examples' text as the model sees it (id, source, references): in the
    manifest, so its hash, which a resume checks, changes when the data's text does."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.source, list(e.references)]).encode("utf-8",
                                                                        "surrogatepass"))
    return h.hexdigest()


# --------------------------------------------------------------------------- statistics
def category_entropy(examples: Iterable[Example]) -> float:
    """Shannon entropy (bits) of the category mix of `examples`: 0 = one category."""
    counts = Counter(e.category for e in examples)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def all_clients(partition: Partition) -> list[Client]:
    """Every client, train then validation then test."""
    return partition.train_clients + partition.validation_clients + partition.test_clients


def mean_client_category_entropy(partition: Partition) -> float:
    """The heterogeneity statistic: mean over clients of their category entropy (bits).

    0 when every client is one category; approaches the global mix's entropy as clients
    become IID. Compare it with `category_entropy` of all examples to read how far from IID.
    """
    clients = all_clients(partition)
    return sum(category_entropy(c.train + c.test) for c in clients) / len(clients)
