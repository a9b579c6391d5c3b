"""Instruction formatting: how a task instance becomes the text the backbone reads.

Tk-Instruct style (Wang et al. 2022, the format SNI models are trained and scored with):
Definition, optionally k positive examples, then the instance input and an "Output:" cue.
The model is trained to continue the source with the reference output.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from profit_ds.data.types import Example, Instance, Task


@dataclass(frozen=True)
class FormatSpec:
    """What goes into the source text. Defaults suit the built-in suite (definition, no demos).

    `max_source_tokens` / `max_target_tokens` bound the tokenized lengths; text is formatted
    whole here and cut by the trainer with `truncate_source` / `truncate_target`, because only
    the trainer has the backbone's tokenizer. None means no limit.
    """

    add_definition: bool = True
    num_positive_examples: int = 0
    max_source_tokens: int | None = None
    max_target_tokens: int | None = None


def format_source(task: Task, instance: Instance, spec: FormatSpec = FormatSpec()) -> str:
    """Render one instance as Tk-Instruct source text ending in the output cue."""
    parts = []
    if spec.add_definition:
        parts.append(f"Definition: {task.definition.strip()}\n\n")
    for i, demo in enumerate(task.positive_examples[: spec.num_positive_examples], start=1):
        parts.append(f"Positive Example {i} -\nInput: {demo['input'].strip()}\n"
                     f"Output: {demo['output'].strip()}\n\n")
    if spec.num_positive_examples and task.positive_examples:
        parts.append("Now complete the following example -\n")
    parts.append(f"Input: {instance.input.strip()}\nOutput:")
    return "".join(parts)


def to_example(task: Task, instance: Instance, spec: FormatSpec = FormatSpec()) -> Example:
    """Render one instance with its references stripped (ROUGE-L compares stripped text)."""
    return Example(id=instance.id, task=task.name, category=task.category,
                   source=format_source(task, instance, spec),
                   references=tuple(o.strip() for o in instance.outputs))


def truncate_source(ids: Sequence[int], limit: int | None, keep_tail: int) -> list[int]:
    """Cut token ids to `limit`, keeping the head and the last `keep_tail` ids.

    Why not a plain right cut (Tk-Instruct's, for encoder-decoders): a decoder-only model must
    see the "Output:" cue right before the target, and the head holds the Definition. So the
    middle (long inputs, demonstrations) goes first.
    """
    if limit is None or len(ids) <= limit:
        return list(ids)
    tail = min(keep_tail, limit)
    return list(ids[: limit - tail]) + (list(ids[-tail:]) if tail else [])


def truncate_target(ids: Sequence[int], limit: int | None) -> list[int]:
    """Cut target token ids to `limit` from the right: the start of an answer matters most."""
    return list(ids) if limit is None else list(ids[:limit])


@dataclass
class TruncationReport:
    """How many sources and targets were cut, so a run can say so instead of hiding it."""

    sources: int = 0
    sources_truncated: int = 0
    targets: int = 0
    targets_truncated: int = 0

    def record(self, source_cut: bool, target_cut: bool) -> None:
        """Count one tokenized example and whether each side was cut."""
        self.sources += 1
        self.targets += 1
        self.sources_truncated += source_cut
        self.targets_truncated += target_cut

    def summary(self) -> dict:
        """Counts and fractions, for results.json and the run log."""
        return {"sources": self.sources, "sources_truncated": self.sources_truncated,
                "targets": self.targets, "targets_truncated": self.targets_truncated,
                "source_truncated_fraction": self.sources_truncated / max(1, self.sources),
                "target_truncated_fraction": self.targets_truncated / max(1, self.targets)}
