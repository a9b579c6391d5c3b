"""The client state tree's operations, on a state of two leaves of different ranks (as LoRA's
A and B will be), against the same arithmetic on each leaf alone."""
from __future__ import annotations

import pytest
import torch

from profit_ds.fl import state as st
from profit_ds.fl.optim import ClientOptimizer, client_step, init_client_state
from profit_ds.fl.server import ServerOptimizer, ServerState, server_update


def _state(k: int, seed: int = 0) -> st.State:
    g = torch.Generator().manual_seed(seed)
    return {"A": torch.randn(k, 2, 5, generator=g), "B": torch.randn(k, 5, 2, 3, generator=g)}


def test_bank_operations_act_row_by_row_on_every_leaf():
    bank, other = _state(4), _state(4, seed=1)
    mask = torch.tensor([True, False, True, False])
    mixed = st.where(mask, bank, other)
    w = [1.0, 2.0, 3.0, 4.0]
    mean = st.weighted_mean(bank, w)
    for name, leaf in bank.items():
        assert torch.equal(mixed[name][0], leaf[0]) and torch.equal(mixed[name][1], other[name][1])
        assert torch.equal(st.take(bank, [2, 0])[name], leaf[[2, 0]])
        expected = sum(wk * leaf[k] for k, wk in enumerate(w)) / sum(w)
        assert torch.allclose(mean[name], expected)
        assert torch.equal(st.expand(mean, 3)[name][2], mean[name])
        assert st.scale(bank, torch.tensor([0.0, 1.0, 2.0, 3.0]))[name][2].equal(2 * leaf[2])
    bad = {n: t.clone() for n, t in bank.items()}
    bad["B"][3, 0, 0, 0] = float("nan")
    assert st.finite_rows(bad).tolist() == [True, True, True, False]
    assert st.unflatten("x", st.flatten("x", bank)).keys() == bank.keys()
    with pytest.raises(ValueError, match="leaves differ"):
        st.sub(bank, {"A": bank["A"]})


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_client_and_server_optimizers_step_each_leaf_as_alone(name):
    opt = ClientOptimizer(name, weight_decay=0.01)
    bank, grads = _state(3), _state(3, seed=2)
    active, lr = torch.tensor([True, False, True]), torch.tensor([0.1, 0.2, 0.3])
    together = client_step(opt, bank, grads, init_client_state(opt, bank), active, lr)
    for leaf in bank:
        one = {leaf: bank[leaf]}
        alone = client_step(opt, one, {leaf: grads[leaf]}, init_client_state(opt, one), active,
                            lr)
        assert torch.equal(together[leaf], alone[leaf])
    assert torch.equal(together["A"][1], bank["A"][1])  # inactive row untouched
    model, delta = st.row(bank, 0), st.row(grads, 0)
    server = server_update(ServerOptimizer("adam", 0.1), model, delta, ServerState())
    for leaf in model:
        alone = server_update(ServerOptimizer("adam", 0.1), {leaf: model[leaf]},
                              {leaf: delta[leaf]}, ServerState())
        assert torch.equal(server[leaf], alone[leaf])
