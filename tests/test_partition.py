"""Partitions: each heterogeneity level has its stated property; splits, caps and determinism."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.partition import (PartitionSpec, _LazyShuffle, all_clients, build_partition,
                                      category_entropy, mean_client_category_entropy,
                                      parse_heterogeneity)
from profit_ds.data.sni import load_sni_directory
from profit_ds.data.types import Task
from profit_ds.errors import UsageError

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "sni-sample" / "tasks"


@pytest.fixture(scope="module")
def sni(tmp_path_factory: pytest.TempPathFactory) -> list[Task]:
    """The real sample slice (24 tasks, 8 categories), or the built-in suite of the same shape."""
    if not SAMPLE.is_dir():
        return builtin_tasks(instances_per_task=50)
    return load_sni_directory(SAMPLE, cache_dir=tmp_path_factory.mktemp("cache"))


def _categories(client) -> set[str]:
    return {e.category for e in client.train + client.test}


def test_task_heterogeneity_gives_one_task_per_client(sni):
    part = build_partition(sni, PartitionSpec(heterogeneity="task"))
    clients = all_clients(part)
    assert len(clients) == len(sni)
    for client in clients:
        assert {e.task for e in client.train + client.test} == {client.name}
    assert len(all_clients(build_partition(sni, PartitionSpec(num_clients=9)))) == 9


@pytest.mark.parametrize("k", [1, 2, 3])
def test_categories_k_bounds_each_clients_categories(sni, k):
    part = build_partition(sni, PartitionSpec(heterogeneity=f"categories:{k}", num_clients=16))
    assert all(len(_categories(c)) == k for c in all_clients(part))


def test_categories_1_every_client_shares_one_category(sni):
    part = build_partition(sni, PartitionSpec(heterogeneity="categories:1"))
    assert all(len(_categories(c)) == 1 for c in all_clients(part))
    assert mean_client_category_entropy(part) == 0.0


def test_larger_dirichlet_alpha_raises_mean_entropy(sni):
    def entropy(alpha: float) -> float:
        spec = PartitionSpec(heterogeneity=f"dirichlet:{alpha}", max_per_client=20, seed=3)
        return mean_client_category_entropy(build_partition(sni, spec))

    values = [entropy(a) for a in (0.01, 0.3, 3.0, 100.0)]
    assert values == sorted(values) and values[-1] - values[0] > 1.5


def test_iid_clients_are_close_to_the_global_mix(sni):
    part = build_partition(sni, PartitionSpec(heterogeneity="iid", num_clients=8))
    pooled = [e for c in all_clients(part) for e in c.train + c.test]
    assert mean_client_category_entropy(part) > 0.9 * category_entropy(pooled)


def test_splits_global_sets_and_disjointness(sni):
    part = build_partition(sni, PartitionSpec(heterogeneity="dirichlet:1", num_clients=12))
    assert (len(part.train_clients), len(part.validation_clients), len(part.test_clients)) == (
        6, 2, 4)
    assert part.global_test == [e for c in part.test_clients for e in c.test]
    assert part.global_validation == [e for c in part.validation_clients for e in c.test]
    ids = [e.id for c in all_clients(part) for e in c.train + c.test]
    assert len(ids) == len(set(ids))
    assert all(c.train and c.test for c in all_clients(part))


def test_caps(sni):
    part = build_partition(sni, PartitionSpec(heterogeneity="iid", num_clients=10,
                                              max_instances=200))
    sizes = [len(c.train) + len(c.test) for c in all_clients(part)]
    assert sum(sizes) == 200 and max(sizes) == 20
    part = build_partition(sni, PartitionSpec(heterogeneity="task", max_per_client=7))
    assert {len(c.train) + len(c.test) for c in all_clients(part)} == {7}


def test_seed_determines_the_manifest(sni):
    spec = PartitionSpec(heterogeneity="dirichlet:0.5", num_clients=12, seed=7)
    first, again = build_partition(sni, spec), build_partition(sni, spec)
    other = build_partition(sni, PartitionSpec(heterogeneity="dirichlet:0.5", num_clients=12,
                                               seed=8))
    assert first.manifest_hash == again.manifest_hash
    assert first.manifest == again.manifest
    assert other.manifest_hash != first.manifest_hash
    assert other.manifest["clients"] != first.manifest["clients"]


@pytest.mark.parametrize("spec, message", [
    (PartitionSpec(heterogeneity="task", num_clients=1000), "fewer than the 2"),
    (PartitionSpec(heterogeneity="iid", num_clients=1000), "fewer than the 2"),
    (PartitionSpec(heterogeneity="categories:9"), "only 8 categories"),
    (PartitionSpec(heterogeneity="task", num_clients=2), "too few"),
    (PartitionSpec(heterogeneity="dirichlet:-1"), "unknown value"),
])
def test_fewer_clients_than_asked_is_an_error(sni, spec, message):
    with pytest.raises(UsageError, match=message):
        build_partition(sni, spec)


def test_task_clients_share_tasks_when_there_are_more_clients_than_tasks(sni):
    part = build_partition(sni, PartitionSpec(heterogeneity="task", num_clients=48, seed=3))
    clients = part.train_clients + part.validation_clients + part.test_clients
    assert len(clients) == 48 and len({c.name for c in clients}) == 48
    by_task: dict[str, set[str]] = {}
    for c in clients:
        tasks = {e.task for e in c.train + c.test}
        assert len(tasks) == 1  # still one task per client
        by_task.setdefault(tasks.pop(), set()).update(e.id for e in c.train + c.test)
    assert len(by_task) == 24
    ids = [e.id for c in clients for e in c.train + c.test]
    assert len(ids) == len(set(ids))  # a task's instances are split, never duplicated


@pytest.mark.parametrize("text", ["", "task:1", "iid:2", "categories:0", "categories:x",
                                  "dirichlet:", "dirichlet:nan", "zipf:1"])
def test_bad_heterogeneity_values(text):
    with pytest.raises(UsageError, match="--heterogeneity"):
        parse_heterogeneity(text)


def test_lazy_shuffle_is_a_permutation():
    rng = random.Random(0)
    shuffle = _LazyShuffle(50)
    assert sorted(shuffle.draw(rng) for _ in range(50)) == list(range(50))
