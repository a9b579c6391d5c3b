"""Export a run's prompts as PEFT prompt-tuning adapters.

A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors` holding
`prompt_embeddings`) loads with `PeftModel.from_pretrained(base_model, directory)` and then runs
exactly the forward profit-ds trained with (prompt prepended to the input embeddings), so a
personalized prompt can be served or evaluated with the ordinary HF/PEFT stack.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from profit_ds.errors import UsageError
from profit_ds.model.aliases import resolve_model


def read_prompt(run_dir: Path, client: str | None, lr: float | None) -> torch.Tensor:
    """The global prompt, or `client`'s personalized prompt at `lr` (its only one if omitted)."""
    if client is None:
        path, key = run_dir / "global_prompt.safetensors", "prompt"
    else:
        path, key = run_dir / "clients" / f"{client}.safetensors", None
    if not path.is_file():
        raise UsageError(f"{path}: no such file (is {run_dir} a finished run?)")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        if key is None:
            wanted = [k for k in keys if lr is None or k == f"lr={lr:g}"]
            if len(wanted) != 1:
                raise UsageError(f"--lr: {path} holds {', '.join(keys)}; pick one with --lr")
            key = wanted[0]
        return f.get_tensor(key)


def export_peft(prompt: torch.Tensor, base_model: str, out: Path) -> None:
    """Write `prompt` [P, D] as a PEFT PromptTuning adapter for `base_model`."""
    from peft import PromptTuningConfig, TaskType

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=prompt.shape[0],
                                token_dim=prompt.shape[1], num_transformer_submodules=1,
                                base_model_name_or_path=base_model)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_file({"prompt_embeddings": prompt.float().contiguous()},
              out / "adapter_model.safetensors")


def export_run(run_dir: Path, out: Path, client: str | None = None,
               lr: float | None = None) -> Path:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{config_path}: no such file (is {run_dir} a profit-ds run?)")
    model = json.loads(config_path.read_text())["model"]
    export_peft(read_prompt(run_dir, client, lr), resolve_model(model).location, out)
    return out
