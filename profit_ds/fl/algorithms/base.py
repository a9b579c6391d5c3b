"""What an algorithm is to the federated round, and the work every client update shares.

A round (`fl/rounds.py`) samples clients, hands them to the algorithm `k_parallel` at a time
as one bank, aggregates the update directions it returns (example-weighted), and applies the
server optimizer. What differs between algorithms is only what a client computes, and what
state an algorithm keeps across rounds (SCAFFOLD's control variates), so that is the protocol.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import torch

from profit_ds.fl.clients import ClientData, local_batches
from profit_ds.fl.local import Schedule
from profit_ds.fl.state import State, expand
from profit_ds.model.backbone import Backbone

if TYPE_CHECKING:
    from profit_ds.fl.rounds import RoundSpec


@dataclass(frozen=True)
class ClientWork:
    """Where this round's client updates run: the backbone, the settings, the round."""

    backbone: Backbone
    spec: "RoundSpec"
    round_idx: int
    after_step: Callable[[], None] | None = None
    # client name -> the leaves it keeps between rounds (FedSA-LoRA's B: `Adapter.private`)
    private: dict[str, State] = field(default_factory=dict)

    def start(self, model: State, group: Sequence[ClientData]) -> State:
        """The group's starting bank: the global state, with each client's private leaves
        (if it has trained before) in place of the global ones."""
        bank = expand(model, len(group))
        for k, client in enumerate(group):
            for name, t in self.private.get(client.name, {}).items():
                bank[name][k] = t
        return bank

    def finish(self, group: Sequence[ClientData], bank: State) -> None:
        """Keep each client's private leaves of its final bank row for its next round."""
        kept = [n for n in bank if self.spec.adapter.private(n)]
        for k, client in enumerate(group):
            if kept:
                self.private[client.name] = {n: bank[n][k].clone() for n in kept}

    def schedules(self, group: Sequence[ClientData]) -> list[Schedule]:
        """Each client's local steps this round: `local_epochs` over its train set in its own
        deterministic order (a function of seed, round and client only)."""
        spec = self.spec
        return [[[c.train[i] for i in batch] for batch in local_batches(
            c.num_examples, spec.local_epochs, spec.batch_size,
            f"{spec.seed}/round{self.round_idx}/{c.name}")] for c in group]


class Algorithm(Protocol):
    name: str

    def client_updates(self, work: ClientWork, model: State, group: Sequence[ClientData]
                       ) -> tuple[State, torch.Tensor]:
        """Each client's update direction (a bank, row k for group[k]; the server adds their
        example-weighted mean through its optimizer), and each one's mean training loss."""

    def end_round(self, clients: Sequence[ClientData], num_clients: int) -> None:
        """After the round's last group: fold what the clients reported into the algorithm's
        own state (`num_clients`: all train clients, sampled or not)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        """The algorithm's state for a checkpoint (nothing for a stateless one)."""

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `tensors()` saved."""


@dataclass
class Stateless:
    """An algorithm that keeps nothing between rounds (what a round is, in `spec`)."""

    spec: "RoundSpec"

    def end_round(self, clients: Sequence[ClientData], num_clients: int) -> None:
        pass

    def tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        pass
