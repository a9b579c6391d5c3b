"""The training math against plain references: ZeRO-3 gradients vs an unsharded model,
vectorized client optimizers vs torch.optim, FedAvg/FedSGD vs their textbook definitions."""
from __future__ import annotations

import torch

from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.format import to_example
from profit_ds.fl.clients import ClientData, EvalSet, local_batches
from profit_ds.fl import algorithms
from profit_ds.fl.gradients import mean_loss_gradients
from profit_ds.fl.optim import ClientOptimizer, client_step, init_client_state
from profit_ds.fl.rounds import RoundSpec, federated_round, sample_clients
from profit_ds.fl.server import ServerOptimizer, ServerState, server_update
from profit_ds.model.prompted import client_loss_sums, collate, encode

P = 4


def _clients(backbone, n_clients=3, n_train=6):
    tasks = builtin_tasks(instances_per_task=n_train + 2)
    out = []
    for t in tasks[:n_clients]:
        ex = [to_example(t, i) for i in t.instances]
        test = encode(backbone.tokenizer, ex[:2])
        out.append(ClientData(t.name, "train", encode(backbone.tokenizer, ex[2:]),
                              EvalSet(test, [e.references for e in ex[:2]], [e.id for e in ex[:2]])))
    return out


def _bank(backbone, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"prompt": torch.randn(k, P, backbone.hidden_size, generator=g) * 0.1}


def _round(backbone, prompt, state, clients, spec, r, k_parallel, algorithm=None):
    """One round on a global prompt tensor; returns the new prompt tensor and the metrics."""
    new, metrics = federated_round(backbone, {"prompt": prompt}, state,
                                   algorithm or algorithms.create(spec), clients, spec, r,
                                   k_parallel)
    return new["prompt"], metrics


def _reference_client_grad(model, prompt, encoded):
    """Plain PyTorch: one client, its mean token loss, autograd."""
    leaf = prompt.clone().unsqueeze(0).requires_grad_(True)
    batch = collate(encoded, [0] * len(encoded), 0)
    loss = client_loss_sums(model, leaf, batch)[0] / (batch.labels != -100).sum()
    loss.backward()
    return leaf.grad[0], loss.detach()


def test_zero3_prompt_gradient_equals_unsharded_model(backbone, reference_model):
    clients = _clients(backbone)
    bank = _bank(backbone, len(clients))
    rows = [(k, e) for k, c in enumerate(clients) for e in c.train]
    grads, losses = mean_loss_gradients(backbone, bank, rows, rows_per_forward=4)
    for k, c in enumerate(clients):
        ref_grad, ref_loss = _reference_client_grad(reference_model, bank["prompt"][k], c.train)
        rel = (grads["prompt"][k] - ref_grad).norm() / ref_grad.norm()
        assert rel < 1e-5, f"client {k}: relative gradient error {rel:.2e}"
        assert torch.allclose(losses[k], ref_loss, rtol=1e-5)


def test_one_rank_runs_the_whole_model_with_the_same_gradients(tiny_model_dir, backbone):
    """At one rank without offload ZeRO-3 has nothing to partition, so the model runs plain;
    its gradients are ZeRO-3's (checked against an unsharded model above) up to rounding."""
    from profit_ds.model.backbone import load_backbone

    whole = load_backbone(str(tiny_model_dir), "fp32")
    assert whole.engine is None and backbone.engine is not None
    assert not any(hasattr(p, "ds_id") for p in whole.model.parameters())
    assert whole.resident_parameter_bytes() == backbone.resident_parameter_bytes()
    clients = _clients(backbone)
    bank = _bank(backbone, len(clients))
    rows = [(k, e) for k, c in enumerate(clients) for e in c.train]
    plain, plain_losses = mean_loss_gradients(whole, bank, rows, rows_per_forward=4)
    sharded, sharded_losses = mean_loss_gradients(backbone, bank, rows, rows_per_forward=4)
    plain, sharded = plain["prompt"], sharded["prompt"]
    assert plain.abs().sum() > 0
    assert (plain - sharded).norm() / sharded.norm() < 1e-6
    assert torch.allclose(plain_losses, sharded_losses, rtol=1e-6)


def test_client_gradient_does_not_depend_on_batch_mates(backbone):
    clients = _clients(backbone)
    bank = _bank(backbone, len(clients))
    alone, _ = mean_loss_gradients(backbone, {"prompt": bank["prompt"][:1]},
                                   [(0, e) for e in clients[0].train], 64)
    mixed, _ = mean_loss_gradients(backbone, bank, [(k, e) for k, c in enumerate(clients)
                                                    for e in c.train], 64)
    assert torch.allclose(alone["prompt"][0], mixed["prompt"][0], rtol=1e-5, atol=1e-8)


def test_vectorized_adam_and_sgd_match_torch_optim_per_client():
    torch.manual_seed(0)
    k, steps = 3, 5
    bank = torch.randn(k, P, 8)
    grads_seq = [torch.randn(k, P, 8) for _ in range(steps)]
    active_seq = [torch.tensor([True, t < 3, t % 2 == 0]) for t in range(steps)]  # masks
    lr = torch.tensor([0.1, 0.01, 0.5])
    for name, torch_opt in (("adam", lambda p, lr_: torch.optim.AdamW(p, lr=lr_, weight_decay=0.01)),
                            ("sgd", lambda p, lr_: torch.optim.SGD(p, lr=lr_, weight_decay=0.01))):
        opt = ClientOptimizer(name, weight_decay=0.01)
        state = init_client_state(opt, {"prompt": bank})
        ours = {"prompt": bank.clone()}
        for g, a in zip(grads_seq, active_seq):
            ours = client_step(opt, ours, {"prompt": g}, state, a, lr)
        ours = ours["prompt"]
        for c in range(k):
            p = torch.nn.Parameter(bank[c].clone())
            ref = torch_opt([p], float(lr[c]))
            for g, a in zip(grads_seq, active_seq):
                if a[c]:
                    p.grad = g[c].clone()
                    ref.step()
            assert torch.allclose(ours[c], p.detach(), rtol=1e-6, atol=1e-7), (name, c)


def _spec(algo, opt="sgd", lr=0.5, server=ServerOptimizer("sgd", 1.0), per_round=1, epochs=2):
    return RoundSpec(algo=algo, client_opt=ClientOptimizer(opt), client_lr=lr, local_epochs=epochs,
                     batch_size=2, server_opt=server, clients_per_round=per_round, seed=0)


def test_fedavg_one_client_sgd_server_lr1_equals_local_training(backbone, reference_model):
    clients = _clients(backbone, n_clients=1)
    prompt = _bank(backbone, 1)["prompt"][0]
    spec = _spec("fedavg", "sgd", lr=0.5)
    new, metrics = _round(backbone, prompt, ServerState(), clients, spec, 1, k_parallel=1)
    # reference: the client's own plain SGD loop on the unsharded model
    p = prompt.clone()
    for batch in local_batches(clients[0].num_examples, 2, 2, f"0/round1/{clients[0].name}"):
        g, _ = _reference_client_grad(reference_model, p, [clients[0].train[i] for i in batch])
        p = p - 0.5 * g
    assert torch.allclose(new, p, rtol=1e-5, atol=1e-7)
    assert metrics["clients"] == [clients[0].name]


def test_fedsgd_server_step_is_weighted_mean_gradient_step(backbone, reference_model):
    clients = _clients(backbone, n_clients=3)
    clients[1].train = clients[1].train[:3]  # unequal sizes: the mean is example-weighted
    prompt = _bank(backbone, 1)["prompt"][0]
    spec = _spec("fedsgd", server=ServerOptimizer("sgd", 0.7), per_round=3)
    new, _ = _round(backbone, prompt, ServerState(), clients, spec, 1, k_parallel=2)
    n = torch.tensor([float(c.num_examples) for c in clients])
    grads = torch.stack([_reference_client_grad(reference_model, prompt, c.train)[0]
                         for c in clients])
    expected = prompt - 0.7 * (n.view(-1, 1, 1) * grads).sum(0) / n.sum()
    assert torch.allclose(new, expected, rtol=1e-5, atol=1e-7)


def test_fedavg_result_does_not_depend_on_clients_in_parallel(backbone):
    clients = _clients(backbone, n_clients=3)
    prompt = _bank(backbone, 1)["prompt"][0]
    spec = _spec("fedavg", "adam", lr=0.05, per_round=3,
                 server=ServerOptimizer("adam", 0.1))
    results = []
    for k in (1, 3):
        state = ServerState()
        p = prompt
        for r in (1, 2):
            p, _ = _round(backbone, p, state, clients, spec, r, k_parallel=k)
        results.append(p)
    rel = (results[0] - results[1]).norm() / results[0].norm()
    assert rel < 1e-5


def test_server_optimizers_follow_fedopt():
    x = torch.ones(2, 3)
    d = torch.full((2, 3), 0.5)

    def step(opt):
        return server_update(opt, {"w": x}, {"w": d}, ServerState())["w"]
    assert torch.allclose(step(ServerOptimizer("sgd", 1.0)), x + d)
    out = step(ServerOptimizer("adam", 0.1, betas=(0.9, 0.99), tau=1e-3))
    m, v = 0.1 * d, 0.01 * d * d
    assert torch.allclose(out, x + 0.1 * m / (v.sqrt() + 1e-3))
    out = step(ServerOptimizer("adagrad", 0.1, tau=1e-3))
    assert torch.allclose(out, x + 0.1 * (0.1 * d) / (d.abs() + 1e-3))


def test_client_sampling_depends_only_on_seed_and_round():
    a = sample_clients(12, 6, seed=3, round_idx=5)
    assert a == sample_clients(12, 6, seed=3, round_idx=5)
    assert len(set(a)) == 6
    assert a != sample_clients(12, 6, seed=3, round_idx=6)
