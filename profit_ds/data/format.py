"""Instruction formatting: how a task instance becomes the text the backbone reads.

Tk-Instruct style (Wang et al. 2022, the format SNI models are trained and scored with):
Definition, optionally k positive examples, then the instance input and an "Output:" cue.
The model is trained to continue the source with the reference output.
"""
from __future__ import annotations

from dataclasses import dataclass

from profit_ds.data.types import Example, Instance, Task


@dataclass(frozen=True)
class FormatSpec:
    """What goes into the source text. Defaults suit the built-in suite (definition, no demos)."""

    add_definition: bool = True
    num_positive_examples: int = 0


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
    return Example(id=instance.id, task=task.name, category=task.category,
                   source=format_source(task, instance, spec),
                   references=tuple(o.strip() for o in instance.outputs))
