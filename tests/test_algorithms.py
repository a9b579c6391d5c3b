"""The algorithm plug-ins against their definitions: FedProx at mu 0 is FedAvg, at mu > 0 the
proximal SGD loop."""
from __future__ import annotations

import torch

from profit_ds.fl import algorithms
from profit_ds.fl.clients import local_batches
from profit_ds.fl.optim import ClientOptimizer
from profit_ds.fl.rounds import RoundSpec, federated_round
from profit_ds.fl.server import ServerOptimizer, ServerState
from test_training_math import _bank, _clients, _reference_client_grad

LR, EPOCHS, BATCH = 0.5, 2, 2


def _spec(algo: str, per_round: int = 1, mu: float = 0.0) -> RoundSpec:
    return RoundSpec(algo=algo, client_opt=ClientOptimizer("sgd"), client_lr=LR,
                     local_epochs=EPOCHS, batch_size=BATCH, server_opt=ServerOptimizer("sgd", 1.0),
                     clients_per_round=per_round, seed=0, prox_mu=mu)


def _rounds(backbone, algo, clients, rounds=1, **kw):
    """The global prompt after `rounds` rounds, and the algorithm object (its state)."""
    spec = _spec(algo, per_round=len(clients), **kw)
    algorithm, server = algorithms.create(spec), ServerState()
    model = {"prompt": _bank(backbone, 1)["prompt"][0]}
    for r in range(1, rounds + 1):
        model, _ = federated_round(backbone, model, server, algorithm, clients, spec, r, 2)
    return model["prompt"], algorithm


def _local_sgd(reference_model, prompt, client, round_idx, extra=lambda p: 0.0):
    """A client's plain SGD loop on the unsharded model, with `extra(p)` added to each
    gradient; returns the final prompt and the number of steps."""
    p = prompt.clone()
    steps = local_batches(client.num_examples, EPOCHS, BATCH, f"0/round{round_idx}/{client.name}")
    for batch in steps:
        g, _ = _reference_client_grad(reference_model, p, [client.train[i] for i in batch])
        p = p - LR * (g + extra(p))
    return p, len(steps)


def test_fedprox_at_mu_0_is_fedavg_and_at_mu_above_0_the_proximal_loop(backbone,
                                                                      reference_model):
    clients = _clients(backbone, n_clients=1)
    fedavg, _ = _rounds(backbone, "fedavg", clients)
    assert torch.equal(_rounds(backbone, "fedprox", clients, mu=0.0)[0], fedavg)
    prox, _ = _rounds(backbone, "fedprox", clients, mu=0.3)
    start = _bank(backbone, 1)["prompt"][0]
    expected, _ = _local_sgd(reference_model, start, clients[0], 1, lambda p: 0.3 * (p - start))
    assert torch.allclose(prox, expected, rtol=1e-5, atol=1e-7)
    assert (prox - fedavg).norm() > 1e-3 * fedavg.norm()  # the term did something
