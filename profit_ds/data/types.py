"""The data model shared by every loader, the partitioner and the trainer.

A `Task` is one SNI task (or one built-in task) as loaded; an `Example` is one instance rendered
into the text the model sees; a `Client` holds its own train and test examples; a `Partition`
is the whole federated split, with the pooled global sets and a manifest that says which
instance went where.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Instance:
    """One task instance: an input and one or more acceptable reference outputs."""

    id: str
    input: str
    outputs: tuple[str, ...]


@dataclass
class Task:
    """One task in SNI's per-task JSON shape (fields we use)."""

    name: str
    definition: str
    categories: tuple[str, ...]
    instances: list[Instance]
    positive_examples: list[dict] = field(default_factory=list)
    source: str = "builtin"

    @property
    def category(self) -> str:
        """The first category: SNI tasks almost always have exactly one."""
        return self.categories[0]


@dataclass(frozen=True)
class Example:
    """An instance rendered for the model: `source` is the full instruction text ending in the
    output cue; `references` are the outputs ROUGE-L takes the max over; `target` is the one
    reference used as the training label."""

    id: str
    task: str
    category: str
    source: str
    references: tuple[str, ...]

    @property
    def target(self) -> str:
        return self.references[0]


@dataclass
class Client:
    """A federated client: its own train examples and its own (local) test examples."""

    name: str
    split: str  # "train" | "validation" | "test"
    train: list[Example]
    test: list[Example]

    @property
    def num_examples(self) -> int:
        return len(self.train)


@dataclass
class Partition:
    """Train/validation/test clients plus the pooled global evaluation sets.

    `global_test` pools the test clients' local test sets (the general distribution);
    `global_validation` pools the validation clients' test sets, for model selection.
    """

    train_clients: list[Client]
    validation_clients: list[Client]
    test_clients: list[Client]
    global_test: list[Example]
    global_validation: list[Example]
    manifest: dict
    manifest_hash: str
