"""LoRA batched through one backbone pass (profit_ds/adapters/lora.py), checked against PEFT's
own LoRA model: gradients, the exported adapter's logits, generation; FFA keeps A at its init;
FedSA keeps each client's B. K and rank exactness and resume are in test_exactness.py and
test_resume.py, next to the prompt's."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import UNTRAINED, flags
from profit_ds.adapters.lora import LoraAdapter
from profit_ds.config import resolve
from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.format import to_example
from profit_ds.evaluation.generate import generate
from profit_ds.export import FORMAT_FILE, export_run
from profit_ds.fl.algorithms import create
from profit_ds.fl.algorithms.base import ClientWork
from profit_ds.fl.clients import ClientData, EvalSet
from profit_ds.fl.gradients import mean_loss_gradients
from profit_ds.fl.local import run_local_steps
from profit_ds.fl.optim import ClientOptimizer, init_client_state
from profit_ds.fl.rounds import RoundSpec, federated_round
from profit_ds.fl.server import ServerOptimizer, ServerState
from profit_ds.fl.state import expand, take
from profit_ds.model.backbone import Backbone, load_config_and_tokenizer
from profit_ds.model.builtin import BUILTIN_DIR
from profit_ds.model.ds_config import without_zero_init
from profit_ds.model.prompted import collate, encode
from profit_ds.runner import run

LORA = LoraAdapter(rank=4, alpha=8.0)
RTOL = 1e-5


def _state(model, k: int, seed: int = 0, b_scale: float = 0.05) -> dict:
    """A bank of k LoRA states with nonzero B (a fresh B = 0 has no gradient for A)."""
    gen = torch.Generator().manual_seed(seed)
    init = LORA.init(Backbone(model, None, None, "", torch.float32), seed)
    return {n: (t + (b_scale if n.endswith("lora_B") else 0.02) * torch.randn(
        (k, *t.shape), generator=gen)) for n, t in init.items()}


def _rows(tokenizer, clients: int, per: int = 4):
    tasks = builtin_tasks(instances_per_task=per)[:clients]
    return [(k, e) for k, t in enumerate(tasks)
            for e in encode(tokenizer, [to_example(t, i) for i in t.instances])]


def _peft(model, state: dict, adapter: LoraAdapter = LORA):
    """PEFT's LoRA model on a copy of `model`, holding `state` (one client's A and B)."""
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=adapter.rank, lora_alpha=adapter.alpha, target_modules=list(adapter.targets),
        lora_dropout=0.0))
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for leaf, t in state.items():
            module, which = leaf.rsplit(".", 1)
            params[f"base_model.model.{module}.{which}.default.weight"].copy_(t)
    return peft_model, params


def test_init_is_peft_default():
    """B = 0 (a fresh adapter is the bare backbone), A Kaiming-uniform(a=sqrt 5): inside
    +-1/sqrt(d_in), spread over it; the same on every call (every rank draws alike)."""
    model = AutoModelForCausalLM.from_pretrained(BUILTIN_DIR)
    backbone = Backbone(model, None, None, "tiny", torch.float32)
    state = LORA.init(backbone, 3)
    assert len(state) == 2 * 2 * model.config.num_hidden_layers
    for name, t in state.items():
        if name.endswith("lora_B"):
            assert not t.any()
        else:
            bound = 1 / t.shape[1] ** 0.5
            assert t.abs().max() <= bound and t.abs().max() > 0.9 * bound
        assert torch.equal(t, LORA.init(backbone, 3)[name])


def test_a_clients_batched_gradient_equals_peft_lora(reference_model, backbone):
    """Client 1's rows mixed with two other clients' in ZeRO-3 forwards: its A and B
    gradients are those of PEFT's LoRA model holding its adapter, on its rows alone."""
    rows = _rows(backbone.tokenizer, clients=3)
    bank = _state(reference_model, 3)
    grads, losses = mean_loss_gradients(backbone, bank, rows, rows_per_forward=5, adapter=LORA)
    mine = [e for c, e in rows if c == 1]
    batch = collate(mine, [0] * len(mine), backbone.tokenizer.pad_token_id)
    peft_model, params = _peft(reference_model, {n: t[1] for n, t in bank.items()})
    loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      labels=batch.labels).loss
    loss.backward()
    assert losses[1] == pytest.approx(float(loss), rel=RTOL)
    for leaf, g in grads.items():
        module, which = leaf.rsplit(".", 1)
        theirs = params[f"base_model.model.{module}.{which}.default.weight"].grad
        assert float((g[1] - theirs).norm() / theirs.norm()) < RTOL, leaf


def test_activation_checkpointing_gives_the_same_lora_gradients(backbone):
    """With checkpointing the layers recompute in the backward; the adapters' gradients must
    still arrive (the frozen embeddings are made a leaf that needs a gradient) and agree."""
    rows = _rows(backbone.tokenizer, clients=2)
    bank = _state(backbone.model, 2)
    plain, plain_loss = mean_loss_gradients(backbone, bank, rows, 8, adapter=LORA)
    backbone.checkpointing = True
    try:
        ckpt, ckpt_loss = mean_loss_gradients(backbone, bank, rows, 8, adapter=LORA)
    finally:
        backbone.checkpointing = False
    assert torch.allclose(plain_loss, ckpt_loss, rtol=1e-6)
    for leaf in plain:
        assert plain[leaf].abs().sum() > 0, leaf  # every layer's adapter gets a gradient
        assert float((plain[leaf] - ckpt[leaf]).norm() / plain[leaf].norm()) < RTOL, leaf


def _trained_tiny():
    with without_zero_init():  # whole, even after the `backbone` fixture's ZeRO-3 config
        model = AutoModelForCausalLM.from_pretrained(BUILTIN_DIR).eval()
    _, tok = load_config_and_tokenizer("tiny")
    return model, tok


def test_exported_lora_adapter_gives_profit_ds_logits(tmp_path):
    """`profit-ds export` of a LoRA run: PeftModel.from_pretrained on the folder gives the
    logits of profit-ds's own forward under that adapter."""
    model, tok = _trained_tiny()
    state = {n: t[0] for n, t in _state(model, 1, b_scale=0.2).items()}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(
        {"model": "tiny", "adapter": "lora", "lora_rank": 4, "lora_alpha": 8.0,
         "max_new_tokens": 4}))
    from safetensors.torch import save_file
    save_file(state, run_dir / "global_lora.safetensors")
    out = export_run(run_dir, tmp_path / "adapter")
    rows = _rows(tok, clients=2, per=2)
    batch = collate([e for _, e in rows], [0] * len(rows), tok.pad_token_id)
    with torch.no_grad(), LORA.rows(model, expand(state, 1), batch.row_client):
        ours = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        bare = None
    with torch.no_grad():
        bare = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        theirs = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.attention_mask.bool()
    assert (ours - bare)[mask].abs().max() > 1e-2  # the adapter changes the logits
    assert torch.allclose(ours[mask], theirs[mask], rtol=1e-5, atol=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((out / FORMAT_FILE).read_text())["prompt_tokens"] == 0


def test_generation_with_per_row_lora_equals_each_client_alone_and_peft():
    """Rows of three clients' adapters share left-padded batches, and finished rows leave
    the batch (the hooks must follow them): each client's predictions are those of its
    adapter alone, and those of PEFT's generate with that adapter (batched, with its cache,
    as the export's format file says for LoRA)."""
    model, tok = _trained_tiny()
    backbone = Backbone(model, None, tok, "tiny", torch.float32)
    bank = _state(model, 3, b_scale=0.3)
    tasks = builtin_tasks(instances_per_task=2)[:6]
    enc = encode(tok, [to_example(t, i) for t in tasks for i in t.instances])
    jobs = [(k, e) for k in range(3) for e in enc]
    together = generate(backbone, bank, jobs, 6, batch_rows=len(jobs), adapter=LORA)
    for k in range(3):
        alone = generate(backbone, take(bank, [k]), [(0, e) for e in enc], 6,
                         batch_rows=len(enc), adapter=LORA)
        assert together[k * len(enc): (k + 1) * len(enc)] == alone, k
    assert len({tuple(together[k * len(enc): (k + 1) * len(enc)]) for k in range(3)}) > 1
    peft_model, _ = _peft(model, {n: t[2] for n, t in bank.items()})
    tok.padding_side = "left"
    ids = tok([tok.decode(e.source) for e in enc], add_special_tokens=False,
              return_tensors="pt", padding=True)
    assert [list(r[m.bool()]) for r, m in zip(ids.input_ids, ids.attention_mask)] == \
        [list(e.source) for e in enc]
    with torch.no_grad():
        new = peft_model.eval().generate(**ids, max_new_tokens=6, do_sample=False,
                                         eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
    theirs = [t.strip() for t in tok.batch_decode(new[:, ids.input_ids.shape[1]:],
                                                   skip_special_tokens=True)]
    assert theirs == together[2 * len(enc):]


TINY = dict(UNTRAINED, rounds=2, clients_per_round=4, instances_per_task=10, batch_size=4,
            client_opt="adam", client_lr=0.05, personalize_lrs=[0.5], personalize_epochs=1,
            eval_every=0, max_new_tokens=2, adapter="lora")


def test_ffa_keeps_A_bit_identical_to_its_init(tiny_model_dir, tmp_path, backbone):
    """FFA-LoRA: A is never trained, so the global and every personalized A are their init,
    bit for bit, through Adam clients, an Adam server and SGD personalization; B moves."""
    out = tmp_path / "ffa"
    run(resolve(None, {"model": str(tiny_model_dir), "output_dir": str(out), **TINY,
                       "lora_aggregation": "ffa", "server_opt": "adam", "server_lr": 0.05}))
    init = LoraAdapter().init(backbone, 0)
    states = [load_file(out / "global_lora.safetensors")]
    for path in (out / "clients").glob("*.safetensors"):
        tensors = load_file(path)
        states.append({k.split("/", 1)[1]: v for k, v in tensors.items()})
    assert len(states) > 1
    for state in states:
        assert state.keys() == init.keys()
        for name, t in state.items():
            if name.endswith("lora_A"):
                assert torch.equal(t, init[name]), name
            else:
                assert t.abs().max() > 0, name


def _client(name: str, examples) -> ClientData:
    return ClientData(name, "train", list(examples), EvalSet([], [], []))


def test_fedsa_clients_keep_their_own_B(backbone):
    """FedSA-LoRA: after a round each client holds the B it trained (not the average), and
    starts its next round from it, with the global A; a client never sampled starts from
    the global state."""
    fedsa = LoraAdapter(rank=4, alpha=8.0, aggregation="fedsa")
    rows = _rows(backbone.tokenizer, clients=3)
    clients = [_client(f"c{k}", [e for c, e in rows if c == k]) for k in range(3)]
    spec = RoundSpec("fedavg", ClientOptimizer("adam"), 0.05, 1, 2, ServerOptimizer("sgd", 1.0),
                     clients_per_round=2, seed=0, adapter=fedsa)
    model = {n: t[0] for n, t in _state(backbone.model, 1).items()}
    private: dict = {}
    algorithm = create(spec)
    after, _ = federated_round(backbone, model, ServerState(), algorithm, clients, spec, 1, 2,
                               private=private)
    sampled = sorted(private)
    assert len(sampled) == 2 and all(k.endswith("lora_B") for k in private[sampled[0]])
    # the reference: the same clients' local training from the round's global state
    work = ClientWork(backbone, spec, 1)
    group = [c for c in clients if c.name in sampled]
    bank = expand(model, 2)
    ref, _ = run_local_steps(backbone, bank, spec.client_opt,
                             init_client_state(spec.client_opt, bank), torch.full((2,), 0.05),
                             work.schedules(group), adapter=fedsa)
    for k, c in enumerate(group):
        for leaf, t in private[c.name].items():
            assert torch.equal(t, ref[leaf][k]), leaf
            assert not torch.equal(t, after[leaf])  # its own, not the average
    never = next(c for c in clients if c.name not in private)
    start = ClientWork(backbone, spec, 2, private=private).start(after, [group[0], never])
    for leaf in after:
        mine = private[group[0].name].get(leaf, after[leaf])
        assert torch.equal(start[leaf][0], mine) and torch.equal(start[leaf][1], after[leaf])


@pytest.mark.parametrize("extra,message", [
    (["--lora-targets", "q_proj,nope"], "--lora-targets q_proj,nope: the model has no linear "
                                        "layer named nope"),
    (["--lora-aggregation", "mean"], "--lora-aggregation mean: expected one of fedit, ffa, fedsa"),
    (["--lora-rank", "0"], "--lora-rank must be"),
    (["--lora-aggregation", "fedsa", "--algo", "fedsgd"], "--lora-aggregation fedsa:")])
def test_bad_lora_settings_are_one_line_usage_errors(extra, message, tiny_model_dir, tmp_path):
    out = tmp_path / "bad"
    res = subprocess.run([sys.executable, "-m", "profit_ds", "run", "--model",
                          str(tiny_model_dir), "--adapter", "lora", "--output-dir", str(out),
                          *flags({k: v for k, v in TINY.items() if k != "adapter"}), *extra],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (out / "results.json").exists()


def test_lora_takes_its_own_learning_rates_unless_given():
    """LoRA's measured lrs replace the prompt's (built-in and pretrained alike); a flag or a
    config file still wins; the prompt adapter keeps its defaults."""
    from profit_ds.config import LORA_DEFAULTS, REAL_MODEL_DEFAULTS, build

    assert build({"adapter": "lora"}).client_lr == LORA_DEFAULTS["builtin"]["client_lr"]
    pretrained = build({"adapter": "lora", "model": "smollm2-135m"})
    assert pretrained.personalize_lrs == LORA_DEFAULTS["pretrained"]["personalize_lrs"]
    assert pretrained.prompt_init == REAL_MODEL_DEFAULTS["prompt_init"]
    assert build({"adapter": "lora", "client_lr": 0.5}).client_lr == 0.5
    assert build({}).client_lr == 0.1
