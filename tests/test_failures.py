"""Clean failures: one line on stderr, exit code 2, no traceback, and nothing already on disk
changed."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import UNTRAINED, flags
from profit_ds.model.builtin import BUILTIN_DIR


def _snapshot(d):
    return {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}


def _fails_cleanly(args, out, needle):
    out.mkdir(parents=True, exist_ok=True)
    (out / "notes.txt").write_text("keep me")
    before = _snapshot(out)
    res = subprocess.run([sys.executable, "-m", "profit_ds", "run", "--output-dir", str(out),
                          *args], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-1500:]
    assert needle in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert _snapshot(out) == before
    return res.stderr


def test_unknown_model_alias(tmp_path):
    _fails_cleanly(["--model", "llama-9000b"], tmp_path / "o", "--model llama-9000b")


def _model_without_weights(d, **config):
    """A model folder with a config and the built-in tokenizer but no weights file: checks that
    need only those must fail before any weights load (for a hub model: download)."""
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, **config).save_pretrained(d)
    AutoTokenizer.from_pretrained(BUILTIN_DIR).save_pretrained(d)
    return d


def test_tokenizer_model_mismatch(tmp_path):
    d = tmp_path / "mismatch"
    cfg = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    AutoTokenizer.from_pretrained(BUILTIN_DIR).save_pretrained(d)
    _fails_cleanly(["--model", str(d)], tmp_path / "o", "tokenizer")


@pytest.mark.parametrize("config,args,needle", [
    ({"vocab_size": 100}, [], "the tokenizer has"),
    ({"vocab_size": 2000, "max_position_embeddings": 64}, ["--prompt-tokens", "60"],
     "exceed the context of --model"),
])
def test_config_checks_fail_before_the_weights_load(tmp_path, config, args, needle):
    d = _model_without_weights(tmp_path / "m", **config)
    _fails_cleanly(["--model", str(d), *args], tmp_path / "o", needle)


def test_a_model_without_weights_fails_at_loading(tmp_path):
    """The control for the test above: past the checks, the missing weights are an error."""
    d = _model_without_weights(tmp_path / "m", vocab_size=2000)
    _fails_cleanly(["--model", str(d)], tmp_path / "o", "cannot load")


def test_loading_hides_the_weights_bar_but_not_download_bars():
    """The bar transformers draws while loading weights would precede a one-line error found
    after loading (above); a first download of a large backbone keeps its bars."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from profit_ds.model.backbone import _quiet_loading

    hub_utils.enable_progress_bars()
    before = (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled())
    with _quiet_loading():
        assert not hf_logging.is_progress_bar_enabled()
        assert not hub_utils.are_progress_bars_disabled()
    assert (hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()) == before


def test_prompt_longer_than_context(tmp_path):
    _fails_cleanly(["--prompt-tokens", "600"], tmp_path / "o", "--prompt-tokens 600")


@pytest.mark.parametrize("args,needle", [
    (["--server-lr", "0"], "--server-lr"),
    (["--personalize-lrs", "0.1,x"], "--personalize-lrs"),
    (["--heterogeneity", "clusters:3"], "heterogeneity"),
    (["--dtype", "fp8"], "--dtype"),
])
def test_invalid_values(args, needle, tmp_path):
    _fails_cleanly(args, tmp_path / "o", needle)


def test_malformed_config(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("rounds: [1, 2\n")
    _fails_cleanly(["--config", str(bad)], tmp_path / "o", str(bad))
    unknown = tmp_path / "u.yaml"
    unknown.write_text("roundz: 3\n")
    _fails_cleanly(["--config", str(unknown)], tmp_path / "o", "roundz")


def _in_process(monkeypatch, capsys, argv, patch_target, exc):
    from profit_ds import cli

    def boom(*a, **k):
        raise exc
    monkeypatch.setattr(patch_target[0], patch_target[1], boom)
    monkeypatch.setattr(sys, "argv", ["profit-ds", "run", *argv])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    return stop.value.code, capsys.readouterr().err


def test_disk_full_is_one_line(monkeypatch, capsys, tmp_path, tiny_model_dir, backbone):
    from profit_ds import io
    out = tmp_path / "o"
    code, err = _in_process(monkeypatch, capsys,
                            ["--model", str(tiny_model_dir), "--output-dir", str(out),
                             *flags(UNTRAINED)],
                            (io, "_atomic"), OSError(errno.ENOSPC, "No space left on device",
                                                      str(out / "config.json")))
    assert code == 2 and "no space left on device" in err and "config.json" in err


def test_out_of_memory_suggests_remedies(monkeypatch, capsys, tmp_path, tiny_model_dir, backbone):
    from profit_ds import runner
    code, err = _in_process(monkeypatch, capsys,
                            ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"),
                             *flags(UNTRAINED)],
                            (runner, "federated_round"), torch.OutOfMemoryError("CUDA out of memory"))
    assert code == 2 and "out of memory" in err and "--clients-in-parallel" in err


def test_multi_rank_launch_passes_on_the_ranks_exit_code(tmp_path):
    """`--num-procs N` re-runs the command as N ranks; when they fail, the launcher must fail
    with their code (a scheduler or a sweep script relies on it), not exit 0."""
    res = subprocess.run([sys.executable, "-m", "profit_ds", "run", "--num-procs", "2",
                          "--model", "llama-9000b", "--output-dir", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 2, res.stderr[-1500:]
    assert "--model llama-9000b" in res.stderr and "Traceback" not in res.stderr
