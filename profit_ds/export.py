"""Export a run's states as PEFT adapters (prompt tuning or LoRA), with the text format they were
trained on.

A PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors` holding
`prompt_embeddings`) loads with `PeftModel.from_pretrained(base_model, directory)` and then runs
exactly the forward profit-ds trained with (prompt prepended to the input embeddings).
`profit_ds_format.json` next to it says how a source becomes token ids (the template, no
special tokens, truncation) and how to generate so that the run's predictions come back:

PEFT's own `generate` reproduces them only one example per call (no padding) and with
`use_cache=False`. Measured on a short run of the built-in default (`--rounds 5
--clients-per-round 8 --instances-per-task 96`, 80 global test examples; peft 0.21.2,
transformers 5.24.0): that way 0 of 80 predictions differ from the run's; batched and
left-padded as usual, 37 of 80 differ (ROUGE-L 19.3 against the run's 30.1). Two causes, each
measured alone:

- the KV cache: transformers 5 hands the cache to `prepare_inputs_for_generation` as `cache`,
  PEFT looks for `past_key_values`, finds none, takes every decoding step for the first one
  and prepends the virtual tokens again, so every decoding step adds another copy of the
  prompt to the cache and predictions change from the second new token on (37 of 80 differ
  one example per call with the cache, 0 without it). Without the cache each step reruns
  [prompt; tokens so far], which is exact (and slower).
- left padding: PEFT prepends the virtual tokens to the padded row ([prompt; pad; tokens]) and
  drops position ids, so a padded row's tokens sit n_pad positions further from the prompt than
  in training; profit-ds builds [pad; prompt; tokens] with positions from the attention mask
  (batched without the cache: 29 of the 61 padded rows differ, 0 of the 19 unpadded ones).

For batched generation with the cache, `profit_ds.evaluation.generate` (greedy decoding on
`inputs_embeds`, as the base model's own `generate` does) is the way; the format file says the
same.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from profit_ds import io
from profit_ds.config import RunConfig, resolve
from profit_ds.data.format import FormatSpec, format_source
from profit_ds.data.types import Instance, Task
from profit_ds.errors import UsageError
from profit_ds.fl.state import State
from profit_ds.model.backbone import resolve_path

FORMAT_FILE = "profit_ds_format.json"


def client_file(run_dir: Path, client: str) -> str:
    """The file of `client`'s prompts: by the run's clients/index.json (names from the data
    are not file names: profit_ds.names), or its name for runs made before the index."""
    index = run_dir / "clients" / "index.json"
    if index.is_file():
        files = json.loads(index.read_text(encoding="utf-8"))
        if client not in files:
            raise UsageError(f"--client {client}: not a client of {run_dir} (see {index})")
        return files[client]
    return f"{client}.safetensors"


def read_state(run_dir: Path, adapter: str, client: str | None, lr: float | None) -> State:
    """The global state, or `client`'s personalized state at `lr` (its only one if omitted),
    as the run wrote them (`runner.global_file`, `runner.setting_keys`)."""
    from profit_ds.runner import global_file

    if client is None:
        path = run_dir / global_file(adapter)
    else:
        path = run_dir / "clients" / client_file(run_dir, client)
    if not path.is_file():
        raise UsageError(f"{path}: no such file (is {run_dir} a finished run?)")
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        if client is None:
            return {k: f.get_tensor(k) for k in keys}
        settings = sorted({k.split("/", 1)[0] for k in keys})
        wanted = [k for k in settings if lr is None or k == f"lr={lr:g}"]
        if len(wanted) != 1:
            raise UsageError(f"--lr: {path} holds {', '.join(settings)}; pick one with --lr")
        if wanted[0] in keys:  # a one-leaf state (a prompt) under `lr=X`
            return {"prompt": f.get_tensor(wanted[0])}
        head = wanted[0] + "/"
        return {k[len(head):]: f.get_tensor(k) for k in keys if k.startswith(head)}


def source_template(spec: FormatSpec) -> str:
    """The source text `format_source` renders, with `{definition}`, `{input}` and
    `{positive_example_I_input}` / `..._output}` where a task's (stripped) texts go."""
    demos = [{"input": f"{{positive_example_{i}_input}}",
              "output": f"{{positive_example_{i}_output}}"}
             for i in range(1, spec.num_positive_examples + 1)]
    task = Task(name="{task}", definition="{definition}", categories=("{category}",),
                instances=[], positive_examples=demos)
    return format_source(task, Instance(id="{id}", input="{input}", outputs=()), spec)


def run_format(cfg: RunConfig, prompt_tokens: int, tokenizer,
               new_tokens: int | None, new_tokens_note: str, chat: bool = False,
               adapter: str = "prompt") -> dict:
    """Everything needed to turn an example into the token ids the run trained and scored
    on, and to generate as the run did: the one place these facts are written down."""
    spec = FormatSpec(num_positive_examples=cfg.positive_examples)  # as data.for_run builds it
    limit = cfg.max_source_tokens
    lead = "" if chat else "' ' + "
    source = ("tokenizer(tokenizer.apply_chat_template([{'role': 'user', 'content': source}], "
              "tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids"
              if chat else "tokenizer(source, add_special_tokens=False).input_ids")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    peft_kwargs = {"do_sample": False, "use_cache": False, "max_new_tokens": new_tokens,
                   "eos_token_id": eos, "pad_token_id": pad}
    return {
        "model": cfg.model,
        "base_model_name_or_path": resolve_path(cfg.model),
        "prompt_tokens": prompt_tokens,
        "chat_template": chat,
        "text": {
            "style": "tk-instruct",
            "source_template": source_template(spec),
            "add_definition": spec.add_definition,
            "positive_examples": spec.num_positive_examples,
            "notes": "definition, inputs and outputs are stripped before they go in; a task "
                     "with fewer positive examples shows those it has, one with none has no "
                     "'Positive Example' block and no 'Now complete the following example' "
                     "line; " + ("with chat_template, that text is the user's message of the "
                                 "tokenizer's chat template and the target the assistant's "
                                 "reply, output as is" if chat else
                                 "the target is ' ' + output (one leading space)"),
        },
        "tokenization": {
            "source": source,
            "target": (f"tokenizer({lead}output, add_special_tokens=False).input_ids"
                       " + [eos_token_id]"),
            "add_special_tokens": False,
            "max_source_tokens": limit,
            "source_truncation": (None if limit is None else
                                  f"a source over {limit} ids keeps its first {limit - limit // 2}"
                                  f" and its last {limit // 2} ids (the middle is cut, so the "
                                  "Definition and the 'Output:' cue stay)"),
            "max_target_tokens": cfg.max_target_tokens,
            "target_truncation": "training targets keep their first max_target_tokens ids "
                                 "(EOS is always appended)",
        },
        "generation": {
            "decoding": "greedy",
            "max_new_tokens": new_tokens,
            "max_new_tokens_source": new_tokens_note,
            "eos_token_id": eos,
            "pad_token_id": pad,
            "prediction": "the new token ids decoded with skip_special_tokens=True, stripped; "
                          "scored with ROUGE-L against the stripped references",
            "peft_generate": _lora_generate(peft_kwargs) if adapter == "lora" else {
                "kwargs": peft_kwargs,
                "how": "one example per call, unpadded: ids = the source ids above; out = "
                       "peft_model.generate(input_ids=torch.tensor([ids]), attention_mask="
                       "torch.ones(1, len(ids), dtype=torch.long), **kwargs); prediction = "
                       "tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()",
                "why_use_cache_false": "transformers 5 passes the KV cache to "
                    "prepare_inputs_for_generation as `cache`; PEFT (checked: 0.21.2) looks "
                    "for `past_key_values`, so it prepends the virtual tokens again at every "
                    "decoding step and predictions change from the second new token on",
                "why_one_per_call": "PEFT puts the virtual tokens before a left-padded row's "
                    "padding and drops position ids, so a padded row's tokens sit further "
                    "from the prompt than in training",
            },
            "batched": "rows [left padding; prompt; source token embeddings] as inputs_embeds, "
                       "attention mask 0 on the padding, the base model's own generate (KV "
                       "cache on): what profit_ds.evaluation.generate.generate does",
        },
    }


def _lora_generate(kwargs: dict) -> dict:
    """How PEFT's generate gives a LoRA run's predictions: LoRA adds no positions, so
    neither of the prompt adapter's two caveats applies (tests/test_lora.py)."""
    return {"kwargs": {**kwargs, "use_cache": True},
            "how": "left-padded batches as usual: out = peft_model.generate(input_ids=ids, "
                   "attention_mask=mask, **kwargs); prediction = tokenizer.decode(out[r, "
                   "ids.shape[1]:], skip_special_tokens=True).strip()"}


def _resolved(cfg: RunConfig, run_dir: Path, tokenizer) -> tuple[bool, int | None, str]:
    """Whether the run used the chat template, its generation length and where that came
    from: results.json's `resolved` (runs since it exists); for older runs (no chat template
    then), config.json's `max_new_tokens`, or the run's rule on its rebuilt evaluation sets."""
    results = run_dir / "results.json"
    recorded = json.loads(results.read_text()).get("resolved") if results.is_file() else None
    if recorded:
        return (recorded["chat_template"], recorded["max_new_tokens"],
                "results.json resolved.max_new_tokens")
    return (False, *_max_new_tokens(cfg, run_dir, tokenizer))


def _max_new_tokens(cfg: RunConfig, run_dir: Path, tokenizer) -> tuple[int | None, str]:
    """A run's generation length before results.json recorded it: config.json's
    `max_new_tokens`, or (when that is null) the run's rule on its rebuilt evaluation sets."""
    if cfg.max_new_tokens:
        return cfg.max_new_tokens, "config.json max_new_tokens"
    rule = ("the run's rule (config.json max_new_tokens is null): the longest tokenized "
            "' ' + reference in the global test and validation sets + 1, at most 128")
    from profit_ds.data.for_run import load_tasks, run_partition
    from profit_ds.fl.clients import encode_partition
    from profit_ds.runner import max_new_tokens
    try:
        partition = run_partition(cfg, load_tasks(cfg))
    except (UsageError, OSError) as err:
        return None, f"{rule}; not computed: the run's data did not load ({err})"
    results = run_dir / "results.json"
    if results.is_file():
        recorded = json.loads(results.read_text())["data"]["manifest_hash"]
        if partition.manifest_hash != recorded:
            return None, f"{rule}; not computed: the rebuilt partition differs from the run's"
    data = encode_partition(tokenizer, partition, cfg.max_source_tokens, cfg.max_target_tokens)
    return max_new_tokens(cfg, data, tokenizer, chat=False), rule


def export_run(run_dir: Path, out: Path, client: str | None = None,
               lr: float | None = None) -> Path:
    """The run's global (or `client`'s) state as a PEFT adapter in `out` (prompt tuning or
    LoRA, as the run trained), with `profit_ds_format.json` (`run_format`) next to its
    adapter_config.json."""
    from profit_ds.adapters import create
    from profit_ds.model.backbone import load_config_and_tokenizer

    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{config_path}: no such file (is {run_dir} a profit-ds run?)")
    cfg = resolve(None, json.loads(config_path.read_text()))
    adapter = create(cfg)
    state = read_state(run_dir, adapter.name, client, lr)
    _, tokenizer = load_config_and_tokenizer(cfg.model, cfg.trust_remote_code)
    chat, new_tokens, note = _resolved(cfg, run_dir, tokenizer)
    adapter.export(state, resolve_path(cfg.model), out)
    io.write_json(out / FORMAT_FILE, run_format(cfg, adapter.extra_tokens(
        {n: t.unsqueeze(0) for n, t in state.items()}), tokenizer, new_tokens, note, chat,
        adapter.name))
    return out
