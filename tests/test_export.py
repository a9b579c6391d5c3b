"""A prompt exported as a PEFT adapter runs the very forward profit-ds trained with."""
import copy

import torch
from peft import PeftModel
from safetensors.torch import save_file

from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.format import to_example
from profit_ds.export import export_peft, export_run
from profit_ds.model.prompted import client_loss_sums, collate, encode


def test_peft_adapter_reproduces_profit_ds_loss(reference_model, backbone, tmp_path):
    torch.manual_seed(0)
    prompt = torch.randn(5, reference_model.config.hidden_size) * 0.1
    export_peft(prompt, "local-tiny", tmp_path / "adapter")
    base = copy.deepcopy(reference_model)  # PEFT wraps its base model; keep the fixture clean
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    task = builtin_tasks(instances_per_task=3)[0]
    enc = encode(backbone.tokenizer, [to_example(task, i) for i in task.instances])
    batch = collate(enc, [0] * len(enc), backbone.tokenizer.pad_token_id)
    ours = client_loss_sums(reference_model, prompt.unsqueeze(0), batch)[0] / \
        (batch.labels != -100).sum()
    with torch.no_grad():
        theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            labels=batch.labels).loss
    assert torch.allclose(ours, theirs, rtol=1e-5)
    stored = peft_model.get_prompt_embedding_to_save("default")
    assert torch.equal(stored, prompt)


def test_export_run_picks_client_prompt(tmp_path):
    run = tmp_path / "run"
    (run / "clients").mkdir(parents=True)
    (run / "config.json").write_text('{"model": "tiny"}')
    save_file({"prompt": torch.zeros(3, 4)}, run / "global_prompt.safetensors")
    save_file({"lr=1": torch.ones(3, 4), "lr=30": torch.full((3, 4), 2.0)},
              run / "clients" / "c1.safetensors")
    out = export_run(run, tmp_path / "a", client="c1", lr=30.0)
    from safetensors.torch import load_file
    assert torch.equal(load_file(out / "adapter_model.safetensors")["prompt_embeddings"],
                       torch.full((3, 4), 2.0))
