"""The proximal term (mu / 2) ||w - w_anchor||^2, as the gradient it adds at every local step.

FedProx (Li et al. 2020) holds each client near the global model of its round; Profit's
regularized personalization holds a client near the federated prompt. The weight is per bank
row, so rows with different weights (a lambda grid) train in one bank; a row of weight 0 gets
exactly the plain gradient (0 * d is added as +0).
"""
from __future__ import annotations

import torch

from profit_ds.fl.local import GradTerm
from profit_ds.fl.state import State, scale, sub


def proximal(anchor: State, weight: torch.Tensor) -> GradTerm:
    """bank -> weight[k] * (bank[k] - anchor): the gradient of the proximal term."""
    return lambda bank: scale(sub(bank, anchor), weight)
