"""The algorithm plug-ins against their definitions: FedProx at mu 0 is FedAvg, at mu > 0 the
proximal SGD loop; SCAFFOLD with one client is that client's local training, and with several
its control variates and corrected steps follow Karimireddy et al.'s option II."""
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


def test_scaffold_with_one_client_is_its_local_training(backbone):
    """One client (N = 1): c = c_1 after every round, so the correction c - c_1 is 0 and each
    round is FedAvg's; with server lr 1, that is the client's own local training (tested
    equal to it in test_training_math). After round 1 the two are bit-identical (c = 0 + c_1);
    later c = c + (c_1+ - c) equals c_1+ up to rounding."""
    clients = _clients(backbone, n_clients=1)
    scaffold, algorithm = _rounds(backbone, "scaffold", clients, rounds=2)
    assert torch.equal(scaffold, _rounds(backbone, "fedavg", clients, rounds=2)[0])
    assert algorithm.c["prompt"].abs().sum() > 0  # the variates were kept, equal, nonzero
    assert torch.allclose(algorithm.c["prompt"], algorithm.c_i[clients[0].name]["prompt"],
                          rtol=1e-6, atol=1e-9)


def test_scaffold_variates_and_corrected_steps_follow_option_ii(backbone, reference_model):
    clients = _clients(backbone, n_clients=3)
    start = _bank(backbone, 1)["prompt"][0]
    after1, algorithm = _rounds(backbone, "scaffold", clients, rounds=1)
    c_i = {}
    for c in clients:  # round 1: no correction yet; c_i+ = (x - y_i) / (K_i lr)
        y, k = _local_sgd(reference_model, start, c, 1)
        c_i[c.name] = (start - y) / (k * LR)
        assert torch.allclose(algorithm.c_i[c.name]["prompt"], c_i[c.name], rtol=1e-4, atol=1e-6)
    c = sum(c_i.values()) / len(clients)  # all N = 3 clients sampled
    assert torch.allclose(algorithm.c["prompt"], c, rtol=1e-4, atol=1e-6)
    after2, _ = _rounds(backbone, "scaffold", clients, rounds=2)
    ys = [_local_sgd(reference_model, after1, cl, 2, lambda p, cl=cl: c - c_i[cl.name])[0]
          for cl in clients]
    n = torch.tensor([float(cl.num_examples) for cl in clients])
    expected = after1 + sum(w * (y - after1) for w, y in zip(n, ys)) / n.sum()
    assert torch.allclose(after2, expected, rtol=1e-4, atol=1e-6)
    fedavg2, _ = _rounds(backbone, "fedavg", clients, rounds=2)
    assert (after2 - fedavg2).norm() > 1e-4 * fedavg2.norm()  # the correction did something


def test_algorithm_state_round_trips_through_its_tensors(backbone):
    clients = _clients(backbone, n_clients=2)
    clients[1].name = "odd/name ü"  # names come from the data: any string
    _, algorithm = _rounds(backbone, "scaffold", clients, rounds=1)
    restored = algorithms.create(_spec("scaffold"))
    restored.load(algorithm.tensors())
    assert restored.c_i.keys() == algorithm.c_i.keys()
    for name in algorithm.c_i:
        assert torch.equal(restored.c_i[name]["prompt"], algorithm.c_i[name]["prompt"])
    assert torch.equal(restored.c["prompt"], algorithm.c["prompt"])
