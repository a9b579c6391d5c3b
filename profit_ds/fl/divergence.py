"""Divergence: a non-finite loss, update or state, caught where it first appears.

A learning rate too large for the model (or `--client-lr 1e30`) makes losses or prompts NaN or
infinite within a few steps; scoring such a prompt would report ROUGE-L 0 as if it were a
result, and JSON cannot hold the numbers. The federated round checks each client's loss and
update and the server's step, and personalization each (client, lr) pair after every epoch;
the first bad one is named (phase, round, client, setting) and the run records it as
diverged instead of scoring it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Diverged(Exception):
    """Where training first produced a non-finite number."""

    phase: str          # "federated training" or "personalization"
    what: str           # e.g. "non-finite loss or update"
    round: int | None = None
    client: str | None = None
    setting: str = ""   # the options that set the step size, filled in by the runner

    def __str__(self) -> str:
        parts = [self.phase] + ([f"round {self.round}"] if self.round is not None else [])
        parts += [f"client {self.client}"] if self.client else []
        parts += [f"({self.setting})"] if self.setting else []
        return f"diverged: {' '.join(parts)}: {self.what}"

    def record(self) -> dict:
        return {**asdict(self), "message": str(self)}

