"""`profit-ds run` end to end: data -> backbone -> federated training -> personalization -> files.

Reads like the paper: score the bare backbone (the reference row) and the initial prompt; train
the prompt federatedly for `rounds`; score the federated prompt; personalize it on every test
client and score each step of that; write everything, every prediction included. Every rank
executes this function (SPMD); rank 0 alone prints and writes.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from profit_ds import adapters, checkpoint, distributed, io
from profit_ds.adapters.base import Adapter
from profit_ds.adapters.prompt import PROMPT
from profit_ds.config import RunConfig
from profit_ds.data.for_run import load_tasks, run_partition
from profit_ds.data.types import Partition
from profit_ds.environment import environment
from profit_ds.errors import UsageError
from profit_ds.evaluation.generate import evaluate
from profit_ds.evaluation.predictions import DIRECTORY as PREDICTIONS
from profit_ds.evaluation.predictions import PredictionFiles, set_lines
from profit_ds.fl import algorithms
from profit_ds.fl.clients import ClientData, EvalSet, FederatedData, encode_partition
from profit_ds.fl.divergence import Diverged
from profit_ds.fl.optim import ClientOptimizer
from profit_ds.fl.personalize import (PersonalizeSpec, Prompts, personalize, scored_rows,
                                      summarize)
from profit_ds.fl.rounds import RoundSpec, federated_round
from profit_ds.fl.server import ServerOptimizer, ServerState
from profit_ds.fl.state import State, expand, flatten, unflatten
from profit_ds.model.aliases import resolve_model
from profit_ds.memory import Budgets, Dims, free_memory, work_shape
from profit_ds.memory import budgets as memory_budgets
from profit_ds.model.backbone import DTYPES, Backbone, load_backbone
from profit_ds.names import file_stems
from profit_ds.run_lock import held_by_this_run
from profit_ds.report import Reporter

CHECKPOINTS = "checkpoints"
CLIENTS = "clients"  # personalized prompts: one file per client, named by names.file_stems
CLIENT_INDEX = "index.json"  # client name -> its file in CLIENTS
RUN_LOG = "run.log"  # progress lines, warnings and the final tables, timestamped


def max_new_tokens(cfg: RunConfig, data: FederatedData, tokenizer, chat: bool) -> int:
    """Enough new tokens for the longest reference in any evaluated set (+1 for EOS), <= 128."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens
    refs = [r for s in (data.global_test, data.global_validation) for rs in s.references
            for r in rs]
    lead = "" if chat else " "
    longest = max((len(ids) for ids in tokenizer([lead + r for r in refs],
                                                 add_special_tokens=False)["input_ids"]),
                  default=16)
    return min(128, longest + 1)


@dataclass
class Setup:
    """What a run's config comes to once its backbone is loaded: the encoded data, the
    settings resolved from the model (chat template, generation length) and the budgets
    resolved from the memory free (profit_ds.memory). `personalize` rebuilds it the same way."""

    backbone: Backbone
    data: FederatedData
    chat: bool
    new_tokens: int
    budgets: Budgets
    adapter: Adapter

    @property
    def clients_in_parallel(self) -> int:
        return self.budgets.clients_in_parallel

    def resolved(self) -> dict:
        """For results.json: what the config left to the model and the machine."""
        return {"chat_template": self.chat, "max_new_tokens": self.new_tokens,
                "budgets": self.budgets.to_dict()}


def set_up(cfg: RunConfig, partition: Partition, backbone: Backbone | None = None) -> Setup:
    """Load (or check) the backbone, encode the partition, size the budgets."""
    if backbone is None:
        backbone = load_backbone(cfg.model, cfg.dtype, cfg.ds_config, cfg.trust_remote_code,
                                 check=lambda config, tok: check_fits(cfg, config, tok))
    elif (backbone.name, backbone.dtype) != (cfg.model, DTYPES[cfg.dtype]):
        raise ValueError(f"backbone {backbone.name} ({backbone.dtype}) given for a run of "
                         f"--model {cfg.model} --dtype {cfg.dtype}")
    else:
        check_fits(cfg, backbone.model.config, backbone.tokenizer)
    tokenizer = backbone.tokenizer
    has_template = bool(getattr(tokenizer, "chat_template", None))
    chat = has_template if cfg.chat_template is None else cfg.chat_template
    if chat and not has_template:
        raise UsageError(f"--chat-template: the tokenizer of --model {cfg.model} has no chat "
                         "template")
    data = encode_partition(tokenizer, partition, cfg.max_source_tokens, cfg.max_target_tokens,
                            chat=chat)
    new_tokens = max_new_tokens(cfg, data, tokenizer, chat)
    clients = data.train_clients + data.validation_clients + data.test_clients
    sets = [c.test for c in clients] + [data.global_test, data.global_validation]
    adapter = adapters.create(cfg)
    adapter.check(backbone.model)
    work = work_shape([(len(e.source), len(e.target)) for c in clients for e in c.train],
                      [len(e.source) for s in sets for e in s.encoded], cfg.batch_size,
                      adapter.positions, new_tokens, distributed.world())
    device = distributed.device().type
    memory, source = free_memory(device, cfg.memory_budget)
    if backbone.engine is not None and cfg.memory_budget is None:
        memory -= _gathered_window(cfg, backbone)
        source += ", less ZeRO-3's gathered layers"
    budgets = memory_budgets(Dims.of(backbone.model.config), cfg.dtype, backbone.eager_attention,
                             memory, device, work, cfg.activation_checkpointing, source,
                             cfg.eval_batch_size, adapter)
    if cfg.clients_in_parallel != "auto":
        budgets = replace(budgets, clients_in_parallel=int(cfg.clients_in_parallel),
                          k_fixed=True)
    backbone.limit = budgets.forward
    backbone.checkpointing = budgets.checkpointing
    return Setup(backbone, data, chat, new_tokens, budgets, adapter)


def shared_prompt_scores(scores: Sequence[dict], clients: Sequence[ClientData]) -> dict:
    """Local and global scores of one prompt shared by all test clients.

    The global test set is the union of the test clients' local test sets, so its score is the
    example-weighted mean of the clients' scores: one generation pass gives both.
    """
    n = [len(c.test) for c in clients]
    out = {}
    for metric in ("rouge_l", "exact_match"):
        out[f"local_{metric}"] = sum(s[metric] for s in scores) / len(scores)
        out[f"global_{metric}"] = sum(s[metric] * k for s, k in zip(scores, n)) / sum(n)
    out["clients"] = {c.name: s["rouge_l"] for c, s in zip(clients, scores)}
    return out


def check_fits(cfg: RunConfig, model_config, tokenizer) -> None:
    """Refuse a tokenizer that does not match the model and sequences longer than its context.

    It needs only the model's config and tokenizer, so it runs before the weights load (a
    mistake costs no download): `load_backbone` calls it, and `profit-ds sweep` calls it for
    every cell before the first one runs. A run handed a loaded backbone checks it again.
    """
    rows = model_config.vocab_size
    if len(tokenizer) > rows:
        raise UsageError(f"--model {cfg.model}: the tokenizer has {len(tokenizer)} "
                         f"tokens but the model's embedding has {rows} rows (mismatched "
                         "tokenizer and weights?)")
    prompt_tokens = adapters.create(cfg).positions
    context = getattr(model_config, "max_position_embeddings", None)
    longest = prompt_tokens + (cfg.max_source_tokens or 0) + (cfg.max_target_tokens or 0)
    if context and longest > context:
        prompt = f"--prompt-tokens {prompt_tokens} + " if prompt_tokens else ""
        raise UsageError(f"{prompt}--max-source-tokens {cfg.max_source_tokens} + "
                         f"--max-target-tokens {cfg.max_target_tokens} = {longest} tokens "
                         f"exceed the context of --model {cfg.model} ({context})")


def prepare_output(cfg: RunConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a directory")
    if (out / "results.json").exists() and not cfg.overwrite:
        hint = "it is complete" if cfg.resume else "pass --overwrite to replace it"
        raise UsageError(f"--output-dir {out}: already holds a finished run ({hint})")
    if cfg.resume and not (out / "config.json").exists():
        raise UsageError(f"--resume: {out} holds no run to resume (no config.json)")
    if not cfg.resume and (out / CHECKPOINTS).exists() and not cfg.overwrite:
        raise UsageError(f"--output-dir {out}: holds an unfinished run "
                         "(pass --resume to continue it or --overwrite to start over)")
    return out


def _gathered_window(cfg: RunConfig, backbone: Backbone) -> int:
    """Bytes ZeRO-3 gathers at once during a forward (not yet allocated when the free memory
    is read): as `profit-ds plan` counts them."""
    from profit_ds.model.ds_config import deepspeed_zero, load_ds_config
    from profit_ds.plan import shape_of, window_bytes

    zero = load_ds_config(cfg.ds_config, dtype=cfg.dtype, micro_batch=1)["zero_optimization"]
    return window_bytes(shape_of(backbone.model.config, cfg.model),
                        deepspeed_zero().config.DeepSpeedZeroConfig(**zero),
                        backbone.model.get_input_embeddings().weight.element_size())


@dataclass
class Progress:
    """Everything finished so far: what a checkpoint holds and a resume restores."""

    model: State  # the global client state (prompt tuning: {"prompt": [P, D]})
    server: ServerState = field(default_factory=ServerState)
    algorithm: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. control variates
    round: int = 0
    rounds: list[dict] = field(default_factory=list)
    backbone: dict | None = None  # the bare backbone's scores (no prompt): the reference row
    initial: dict | None = None
    federated: dict | None = None
    records: list[dict] = field(default_factory=list)
    client_prompts: Prompts = field(default_factory=dict)  # name -> (lr, lambda) -> state
    private: dict[str, State] = field(default_factory=dict)  # train client -> kept leaves

    def to_checkpoint(self) -> checkpoint.Checkpoint:
        """Tensors keyed by safe stems (a client's name comes from the data: `names`), the
        stems' names in the state."""
        tensors = {**flatten("model", self.model), **flatten("server", self.server.tensors()),
                   **flatten("algorithm", self.algorithm)}
        for name, kept in self.private.items():  # by the name in hex: any name, no separator
            tensors.update(flatten(f"private/{name.encode().hex()}", kept))
        stems = file_stems(self.client_prompts)
        for name, by_setting in self.client_prompts.items():
            for (lr, lam), state in by_setting.items():
                tensors.update(flatten(f"client/{stems[name]}/{lr!r},{lam!r}", state))
        state = {"server_step": self.server.step, "rounds": self.rounds,
                 "backbone": self.backbone, "initial": self.initial,
                 "federated": self.federated, "records": self.records,
                 "client_stems": {stem: name for name, stem in stems.items()}}
        return checkpoint.Checkpoint(self.round, tensors, state)

    @classmethod
    def from_checkpoint(cls, ckpt: checkpoint.Checkpoint) -> "Progress":
        t, st = ckpt.tensors, ckpt.state
        names = st.get("client_stems", {})
        prompts: Prompts = {}
        for key, value in t.items():
            if key.startswith("client/"):
                _, stem, setting, leaf = key.split("/", 3)
                lr, lam = (float(x) for x in setting.split(","))
                by_setting = prompts.setdefault(names.get(stem, stem), {})
                by_setting.setdefault((lr, lam), {})[leaf] = value
        server = ServerState.from_tensors(st["server_step"], unflatten("server", t) or {})
        hexes = {k.split("/")[1] for k in t if k.startswith("private/")}
        private = {bytes.fromhex(h).decode(): unflatten(f"private/{h}", t) for h in hexes}
        return cls(unflatten("model", t), server, unflatten("algorithm", t) or {}, ckpt.round,
                   st["rounds"], st.get("backbone"), st["initial"], st["federated"],
                   st["records"], prompts, private)


def run(cfg: RunConfig, backbone: Backbone | None = None) -> dict:
    """Run the whole pipeline; returns the results dict (also written to results.json).

    With `cfg.resume`, continues from the newest valid checkpoint in the output directory.

    `backbone`: an already loaded backbone to use instead of loading `cfg.model`. Why: a sweep
    (`profit_ds.sweep`) runs many configs on one backbone in one process; loading and sharding
    a 7B model takes minutes, and the weights are frozen, so every cell can share one load
    (results are identical: nothing here changes the backbone). It must have been loaded with
    `cfg`'s model, dtype, ds_config and trust_remote_code; name and dtype are checked.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out}: exists and is not a directory")
    resolve_model(cfg.model)  # a bad --model fails now, not after the data is loaded
    with held_by_this_run(out):
        return _run(cfg, backbone)


def _run(cfg: RunConfig, backbone: Backbone | None) -> dict:
    """`run` in an output directory this run holds."""
    t0 = time.perf_counter()
    out = prepare_output(cfg)
    main = distributed.is_main()
    if main and not cfg.resume:  # a fresh run (or --overwrite): a fresh log
        (out / RUN_LOG).unlink(missing_ok=True)
    reporter = Reporter(enabled=main, log=out / RUN_LOG)
    partition = run_partition(cfg, load_tasks(cfg))
    cfg_hash = checkpoint.config_hash(cfg.to_dict())
    ckpt_dir = out / CHECKPOINTS
    restored = None
    if cfg.resume:
        restored = checkpoint.load_latest(ckpt_dir, cfg_hash, partition.manifest_hash,
                                          warn=reporter.warn)
    setup = set_up(cfg, partition, backbone)
    backbone, data, new_tokens = setup.backbone, setup.data, setup.new_tokens
    adapter = setup.adapter
    fresh = None if restored else adapter.init(backbone, cfg.seed)  # bad settings fail here
    k_parallel = setup.clients_in_parallel
    reporter.data_summary(partition, backbone, k_parallel)
    reporter.info(_budget_line(setup))
    if main:
        if cfg.overwrite and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        if cfg.overwrite and (out / PREDICTIONS).exists():
            shutil.rmtree(out / PREDICTIONS)
        io.write_json(out / "config.json", cfg.to_dict())
        io.write_json(out / "manifest.json", partition.manifest)
    predictions = PredictionFiles(out, enabled=main)
    timing: dict[str, float] = {"load_s": time.perf_counter() - t0}
    rows, call_tokens = setup.budgets.generation_rows, setup.budgets.generation_tokens

    def score(bank: State, requests: Sequence[tuple[int, EvalSet]], label: str,
              through: Adapter = adapter) -> list[dict]:
        with reporter.task(label, sum(len(s) for _, s in requests)) as advance:
            return evaluate(backbone, bank, requests, new_tokens, rows, advance, through,
                            call_tokens)

    def score_shared(model: State, phase: str, label: str, through: Adapter = adapter) -> dict:
        """One state for every test client; its predictions file."""
        clients = data.test_clients
        scores = score(expand(model, 1), [(0, c.test) for c in clients], label, through)
        predictions.write(phase, [line for c, s in zip(clients, scores) for line in set_lines(
            {"prompt": phase, "client": c.name}, c.test.references, c.test.ids, s)])
        return shared_prompt_scores(scores, clients)

    def save(progress: Progress) -> None:
        if main:
            checkpoint.save(ckpt_dir, progress.to_checkpoint(), cfg_hash,
                            partition.manifest_hash)

    if restored:
        progress = Progress.from_checkpoint(restored)
        reporter.warn(f"resuming after round {progress.round} "
                      f"({len(progress.records)} personalization records done)")
    else:
        progress = Progress(fresh)
    if progress.backbone is None:
        t = time.perf_counter()
        no_prompt = {"prompt": torch.zeros(0, backbone.hidden_size)}  # the bare backbone
        progress.backbone = score_shared(no_prompt, "backbone", "scoring the bare backbone",
                                         PROMPT)
        timing["backbone_eval_s"] = time.perf_counter() - t
        save(progress)
    if progress.initial is None:
        t = time.perf_counter()
        progress.initial = score_shared(progress.model, "initial",
                                        f"scoring the initial {adapter.name}")
        timing["initial_eval_s"] = time.perf_counter() - t
        save(progress)

    spec = RoundSpec(algo=cfg.algo, client_opt=ClientOptimizer(cfg.client_opt),
                     client_lr=cfg.client_lr, local_epochs=cfg.local_epochs,
                     batch_size=cfg.batch_size,
                     server_opt=ServerOptimizer(cfg.server_opt, cfg.server_lr),
                     clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                     prox_mu=cfg.prox_mu, adapter=adapter)
    algorithm = algorithms.create(spec)
    algorithm.load(progress.algorithm)
    metrics_path = out / "metrics.jsonl"
    if main:  # rewrite what the checkpoint vouches for; drop anything later
        io.write_text(metrics_path, "".join(json.dumps(m) + "\n" for m in progress.rounds))
        predictions.keep("validation", lambda line: line["round"] <= progress.round)
    t = time.perf_counter()
    with reporter.task("federated training", cfg.rounds) as advance:
        advance(progress.round)
        for r in range(progress.round + 1, cfg.rounds + 1):
            tr = time.perf_counter()
            try:
                progress.model, metrics = federated_round(backbone, progress.model,
                                                          progress.server, algorithm,
                                                          data.train_clients, spec, r,
                                                          k_parallel, private=progress.private)
            except Diverged as diverged:
                diverged.setting = (f"--algo {cfg.algo} --client-opt {cfg.client_opt} "
                                    f"--client-lr {cfg.client_lr:g} --server-opt "
                                    f"{cfg.server_opt} --server-lr {cfg.server_lr:g}")
                reporter.warn(str(diverged))
                timing["total_s"] = time.perf_counter() - t0
                results = _results(cfg, setup, partition, progress, [], timing,
                                   [diverged.record()])
                if main:  # a finished run: what it did, and where it stopped
                    io.write_json(out / "results.json", results)
                return results
            if cfg.eval_every and (r % cfg.eval_every == 0 or r == cfg.rounds) \
                    and len(data.global_validation):
                val_set = data.global_validation
                val = score(expand(progress.model, 1), [(0, val_set)],
                            "scoring on the global validation set")[0]
                metrics["val_rouge_l"] = val["rouge_l"]
                predictions.append("validation", set_lines(
                    {"prompt": "federated", "round": r}, val_set.references, val_set.ids, val))
            metrics["seconds"] = time.perf_counter() - tr
            progress.rounds.append(metrics)
            progress.round = r
            progress.algorithm = algorithm.tensors()
            save(progress)
            if main:
                with metrics_path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(metrics) + "\n")
            advance(1, f"round {r}/{cfg.rounds} loss {metrics['train_loss']:.3f}")
    timing["train_s"] = time.perf_counter() - t

    if progress.federated is None:
        t = time.perf_counter()
        progress.federated = score_shared(progress.model, "federated",
                                          f"scoring the federated {adapter.name}")
        timing["global_eval_s"] = time.perf_counter() - t
        save(progress)

    t = time.perf_counter()
    timing["personalize_score_s"] = 0.0  # of personalize_s, the rest being local training
    pspec = PersonalizeSpec(ClientOptimizer(cfg.personalize_opt), cfg.personalize_lrs,
                            cfg.personalize_epochs, cfg.batch_size, cfg.seed, adapter=adapter)
    pairs = len(data.test_clients) * len(cfg.personalize_lrs)
    # units: examples trained and rows scored, every epoch of every (client, lr) pair
    per_pair = {c.name: (c.num_examples + len(c.test) + len(data.global_test))
                * cfg.personalize_epochs for c in data.test_clients}
    total = sum(per_pair.values()) * len(cfg.personalize_lrs)
    done_pairs = {(n, lr) for n, by_setting in progress.client_prompts.items()
                  for lr, _ in by_setting}
    predictions.keep("personalized", lambda line: (line["client"], line["lr"]) in done_pairs)
    with reporter.task("personalization", total) as advance:
        advance(sum(per_pair[n] for n, _ in done_pairs))

        def evaluate_bank(bank, requests, tags):
            t_score = time.perf_counter()
            scores = evaluate(backbone, bank, requests, new_tokens, rows, advance, adapter,
                              call_tokens)
            timing["personalize_score_s"] += time.perf_counter() - t_score
            predictions.append("personalized", [
                line for (_, s), tag, result in zip(requests, tags, scores)
                for line in set_lines({"prompt": "personalized", **tag}, s.references, s.ids,
                                      result)])
            return scores

        def group_done(records, prompts):
            progress.records, progress.client_prompts = records, prompts
            save(progress)

        records, client_prompts = personalize(
            backbone, progress.model, data.test_clients, data.global_test, pspec,
            setup.budgets.personalization_group(scored_rows(data.test_clients, data.global_test,
                                                            pspec), pairs), evaluate_bank,
            done=(progress.records, progress.client_prompts), on_group_done=group_done,
            on_trained=advance)
    timing["personalize_s"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0
    diverged = [r["diverged"] for r in records if "diverged" in r]
    for record in diverged:
        reporter.warn(f"{record['message']} (left out of the personalization means)")
    results = _results(cfg, setup, partition, progress, records, timing, diverged)
    if main:
        _write_outputs(out, cfg, adapter, progress.model,
                       {n: {lr: s for (lr, _), s in by_setting.items()}
                        for n, by_setting in client_prompts.items()}, results)
        reporter.results(results, out)
    return results


def _results(cfg: RunConfig, setup: Setup, partition: Partition, progress: Progress,
             records: list[dict], timing: dict, diverged: list[dict]) -> dict:
    """results.json: the contract's fields (docs in README.md), `diverged` where training or
    a personalization pair stopped at a non-finite number (fl/divergence.py)."""
    data = setup.data
    return {"config": cfg.to_dict(), "resolved": setup.resolved(),
            "data": {"manifest_hash": partition.manifest_hash,
                     "train_clients": len(data.train_clients),
                     "validation_clients": len(data.validation_clients),
                     "test_clients": len(data.test_clients),
                     "global_test_examples": len(data.global_test),
                     "truncation": data.truncation},
            "rounds": progress.rounds, "backbone": progress.backbone,
            "initial": progress.initial, "global": progress.federated,
            "personalized": summarize(records),
            "personalized_clients": sorted(records, key=_record_order(cfg)),
            "diverged": diverged, "timing": timing, "environment": environment()}


def _budget_line(setup: Setup) -> str:
    """The budgets as one line of the log: what the run will hold, and why."""
    b = setup.budgets
    return (f"budgets per rank: {b.memory / 1e9:.2f} GB ({b.memory_source}); forward "
            f"<= {b.tokens_per_forward} tokens, generation <= {b.generation_rows} rows and "
            f"{b.generation_tokens} positions, "
            f"activation checkpointing {'on' if b.checkpointing else 'off'}; chat template "
            f"{'on' if setup.chat else 'off'}; {setup.new_tokens} new tokens")


def _record_order(cfg: RunConfig):
    """Records in (client, lr, epoch) order, however the pairs were grouped or resumed."""
    lr_index = {lr: i for i, lr in enumerate(cfg.personalize_lrs)}
    return lambda r: (r["client"], lr_index[r["lr"]], r["epoch"])


def _write_outputs(out: Path, cfg: RunConfig, adapter: Adapter, model: State,
                   client_states: dict[str, dict[float, State]], results: dict) -> None:
    """Final files; results.json last, since its presence marks the run finished."""
    meta = {"model": cfg.model, **adapter.describe(model)}
    io.write_tensors(out / global_file(adapter.name), model, meta)
    stems = file_stems(client_states)
    for name, by_lr in client_states.items():
        io.write_tensors(out / CLIENTS / f"{stems[name]}.safetensors",
                         {key: t for lr, state in by_lr.items()
                          for key, t in setting_keys(lr, state).items()},
                         {**meta, "client": name, "epochs": str(cfg.personalize_epochs)})
    if stems:
        io.write_json(out / CLIENTS / CLIENT_INDEX,
                      {name: f"{stem}.safetensors" for name, stem in stems.items()})
    io.write_json(out / "results.json", results)


def global_file(adapter: str) -> str:
    """The final global state's file: `global_prompt.safetensors`, `global_lora...`."""
    return f"global_{adapter}.safetensors"


def setting_keys(lr: float, state: State) -> dict[str, torch.Tensor]:
    """A personalized state's keys in its client's file: `lr=X` for a one-leaf state (a
    prompt), `lr=X/<leaf>` for each leaf of a larger one (LoRA's A and B per module)."""
    if len(state) == 1:
        return {f"lr={lr:g}": next(iter(state.values()))}
    return {f"lr={lr:g}/{leaf}": t for leaf, t in state.items()}
