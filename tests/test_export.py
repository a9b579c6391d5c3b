"""A prompt exported as a PEFT adapter runs the very forward profit-ds trained with, and PEFT's
generate, used as the export's format file says, gives exactly the run's predictions."""
import copy
import json

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.format import FormatSpec, to_example, truncate_source
from profit_ds.evaluation.generate import generate
from profit_ds.adapters.prompt import PROMPT
from profit_ds.export import FORMAT_FILE, export_run
from profit_ds.model.backbone import Backbone, load_config_and_tokenizer
from profit_ds.model.builtin import BUILTIN_DIR
from profit_ds.model.ds_config import without_zero_init
from profit_ds.model.prompted import client_loss_sums, collate, encode


def test_peft_adapter_reproduces_profit_ds_loss(reference_model, backbone, tmp_path):
    torch.manual_seed(0)
    prompt = torch.randn(5, reference_model.config.hidden_size) * 0.1
    PROMPT.export({"prompt": prompt}, "local-tiny", tmp_path / "adapter")
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
    # config.json's max_new_tokens is null: the run's rule, applied to its rebuilt data
    generation = json.loads((out / FORMAT_FILE).read_text())["generation"]
    assert isinstance(generation["max_new_tokens"], int)
    assert generation["max_new_tokens"] == generation["peft_generate"]["kwargs"]["max_new_tokens"]



def test_peft_generate_reproduces_profit_ds_predictions(tmp_path):
    """PEFT's own generate, used as profit_ds_format.json says (one example per call, unpadded,
    use_cache=False), gives exactly profit-ds's predictions (all rows in one left-padded batch).

    On the built-in trained tiny model: the random-weight fixture model's greedy output barely
    depends on the prompt (the same predictions at prompt scales 0.1 to 3), so it would not
    show a difference. Checked on these 12 examples (peft 0.21.2, transformers 5.24.0): with
    PEFT's default cache, 4 of 12 predictions differ one example per call and 9 of 12 batched
    (left-padded, the usual way); batched without the cache, 6 of the 8 padded rows differ.
    """
    with without_zero_init():  # whole, even after the `backbone` fixture's ZeRO-3 config
        model = AutoModelForCausalLM.from_pretrained(BUILTIN_DIR).eval()
    _, tok = load_config_and_tokenizer("tiny")
    torch.manual_seed(0)
    vocab = model.get_input_embeddings().weight.detach()
    prompt = vocab[torch.randint(3, vocab.shape[0], (20,))].clone()  # as --prompt-init vocab
    run = tmp_path / "run"
    (run / "clients").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(
        {"model": "tiny", "prompt_tokens": 20, "max_new_tokens": 6, "max_source_tokens": 36}))
    save_file({"prompt": prompt}, run / "global_prompt.safetensors")
    out = export_run(run, tmp_path / "adapter")
    fmt = json.loads((out / FORMAT_FILE).read_text())
    assert (fmt["prompt_tokens"], fmt["generation"]["max_new_tokens"]) == (20, 6)

    # the examples' text from the recorded template, their ids as the format file says
    tasks = builtin_tasks(instances_per_task=1)[::2]  # 12 examples, 5 lengths (3 cut)
    template = fmt["text"]["source_template"]
    texts = [template.replace("{definition}", t.definition.strip())
             .replace("{input}", t.instances[0].input.strip()) for t in tasks]
    limit = fmt["tokenization"]["max_source_tokens"]
    ids = [truncate_source(tok(x, add_special_tokens=fmt["tokenization"]["add_special_tokens"])
                           .input_ids, limit, limit // 2) for x in texts]
    # ... are exactly what the run trained and scored on
    enc = encode(tok, [to_example(t, t.instances[0]) for t in tasks], limit)
    assert [list(e.source) for e in enc] == ids
    lengths = [len(i) for i in ids]
    assert len(set(lengths)) == 5 and max(lengths) == limit  # rows are padded; some are cut

    ours = generate(Backbone(model, None, tok, "tiny", torch.float32), {"prompt": prompt.unsqueeze(0)},
                    [(0, e) for e in enc], fmt["generation"]["max_new_tokens"],
                    batch_rows=len(enc))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), out).eval()
    kwargs = fmt["generation"]["peft_generate"]["kwargs"]
    theirs = []
    with torch.no_grad():
        for row in ids:
            x = torch.tensor([row])
            new = peft_model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs)
            theirs.append(tok.decode(new[0, len(row):], skip_special_tokens=True).strip())
    assert len(set(ours)) > 6 and theirs == ours


def test_format_records_the_run_template(tmp_path):
    """With demonstrations: the template renders a task exactly as the run's sources."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(
        {"model": "tiny", "positive_examples": 1, "max_new_tokens": 5, "max_source_tokens": 99}))
    save_file({"prompt": torch.zeros(20, 4)}, run / "global_prompt.safetensors")
    fmt = json.loads((export_run(run, tmp_path / "a") / FORMAT_FILE).read_text())
    assert fmt["tokenization"]["max_source_tokens"] == 99
    assert fmt["text"]["positive_examples"] == 1
    task = builtin_tasks(instances_per_task=1)[0]
    demo = task.positive_examples[0]
    text = (fmt["text"]["source_template"].replace("{definition}", task.definition.strip())
            .replace("{input}", task.instances[0].input.strip())
            .replace("{positive_example_1_input}", demo["input"].strip())
            .replace("{positive_example_1_output}", demo["output"].strip()))
    assert text == to_example(task, task.instances[0], FormatSpec(num_positive_examples=1)).source
