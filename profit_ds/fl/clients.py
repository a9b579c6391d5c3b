"""Clients as the trainer sees them: tokenized once, with their own deterministic batch order.

A client's local batches depend only on (seed, round, client name, epoch): never on which other
clients share its step or on the number of ranks, so results do not depend on
`--clients-in-parallel` or `--num-procs`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from profit_ds.data.format import TruncationReport
from profit_ds.data.types import Client, Example, Partition
from profit_ds.model.prompted import Encoded, encode


@dataclass
class EvalSet:
    """Examples to generate for and score: encoded sources with their references."""

    encoded: list[Encoded]
    references: list[tuple[str, ...]]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.encoded)


@dataclass
class ClientData:
    name: str
    split: str
    train: list[Encoded]
    test: EvalSet

    @property
    def num_examples(self) -> int:
        return len(self.train)


@dataclass
class FederatedData:
    train_clients: list[ClientData]
    validation_clients: list[ClientData]
    test_clients: list[ClientData]
    global_test: EvalSet
    global_validation: EvalSet
    truncation: dict


def _eval_set(tokenizer, examples: list[Example], max_source: int | None,
              report: TruncationReport, chat: bool) -> EvalSet:
    return EvalSet(encode(tokenizer, examples, max_source, report=report, chat=chat),
                   [e.references for e in examples], [e.id for e in examples])


def encode_partition(tokenizer, partition: Partition, max_source_tokens: int | None = None,
                     max_target_tokens: int | None = None, chat: bool = False) -> FederatedData:
    """Tokenize every client's examples once, up front; count what truncation cut. `chat`:
    sources in the tokenizer's chat template (`prompted.encode`)."""
    report = TruncationReport()

    def client(c: Client) -> ClientData:
        return ClientData(c.name, c.split,
                          encode(tokenizer, c.train, max_source_tokens, max_target_tokens, report,
                                 chat),
                          _eval_set(tokenizer, c.test, max_source_tokens, report, chat))
    train = [client(c) for c in partition.train_clients]
    validation = [client(c) for c in partition.validation_clients]
    test = [client(c) for c in partition.test_clients]
    return FederatedData(
        train_clients=train, validation_clients=validation, test_clients=test,
        global_test=_eval_set(tokenizer, partition.global_test, max_source_tokens,
                              TruncationReport(), chat),
        global_validation=_eval_set(tokenizer, partition.global_validation, max_source_tokens,
                                    TruncationReport(), chat),
        truncation=report.summary())


def local_batches(num_examples: int, epochs: int, batch_size: int, key: str) -> list[list[int]]:
    """Example indices of every local step: `epochs` shuffled passes in batches of `batch_size`."""
    steps = []
    for epoch in range(epochs):
        order = list(range(num_examples))
        random.Random(f"{key}/epoch{epoch}").shuffle(order)
        steps += [order[i: i + batch_size] for i in range(0, num_examples, batch_size)]
    return steps
