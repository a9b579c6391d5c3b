"""The plain model's backward summed in ZeRO-3's order, so one rank gives the bits of many.

ZeRO-3 passes every module's tensor inputs and outputs through an identity autograd function
(DeepSpeed's hooks that gather a layer's parameters before its backward and release them
after). Identity in value, those nodes change where autograd adds up a tensor's gradients: a
tensor read by three ops (a Llama layer's residual stream: its norm reads it twice and the
residual add once) gets (a + b) + c instead of a + (b + c). So the plain model, which a run
takes on one rank (nothing to shard), and the ZeRO-3 model, which it takes on several, gave
gradients 2e-7 apart at bit-identical losses, and 1- and 2-rank runs ended 1e-6 apart.

`sum_like_zero3` gives the plain model the same nodes (where a gradient flows, in training
only: a no-grad forward has no backward to order), and with them ZeRO-3's bits
(tests/test_exactness.py: 1 and 2 ranks bit-identical). The ranks themselves change no bit:
each runs whole units and their gradients meet in float64 (fl/gradients.py).
"""
from __future__ import annotations

from typing import Any

import torch


def _wrap(value: Any) -> Any:
    """`value` with each tensor that needs a gradient replaced by a view of itself, in the
    containers DeepSpeed walks (tuples, lists, dicts and model outputs, in place): a node of
    its own in the autograd graph, as DeepSpeed's identity functions are. A view's backward
    runs in C++: with a Python autograd function, DeepSpeed's kind, 5 rounds of the built-in
    default trained in 21 s, against 15-17 s with views and 14-18 s without either."""
    if isinstance(value, torch.Tensor):
        return value.view_as(value) if value.requires_grad else value
    if isinstance(value, (tuple, list)):
        return value.__class__(_wrap(v) for v in value)
    if isinstance(value, dict):
        for key in value:
            value[key] = _wrap(value[key])
    return value


def _inputs(module: torch.nn.Module, args: tuple) -> tuple | None:
    return _wrap(args) if torch.is_grad_enabled() else None


def _outputs(module: torch.nn.Module, args: tuple, output: Any) -> Any:
    return _wrap(output) if torch.is_grad_enabled() else None


def sum_like_zero3(model: torch.nn.Module) -> None:
    """Install the identity nodes on every module of `model`, after the hooks it has."""
    for module in model.modules():
        module.register_forward_pre_hook(_inputs)
        module.register_forward_hook(_outputs)
