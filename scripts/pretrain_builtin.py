"""Pretrain the built-in tiny backbone and its tokenizer; writes `profit_ds/assets/tiny/`.

    python scripts/pretrain_builtin.py [--steps 6000] [--out profit_ds/assets/tiny]

Data: the built-in suite with a different seed from the one runs use, so federated runs are
scored on instances the backbone never saw. Every example is formatted exactly as runs format it
(Tk-Instruct: Definition, Input, "Output:").

The backbone is trained jointly with one learned soft prefix per task (and, for a quarter of
the examples, one shared prefix): the three tasks of a category share their Definition and
differ only in output convention, so the prefix is where the model learns to look for the
convention. The prefixes are discarded; only the backbone ships. This is what makes the tiny
model a faithful stand-in for prompt tuning of a real LLM.
"""
from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch

from profit_ds.data.builtin import builtin_tasks
from profit_ds.data.format import to_example
from profit_ds.model.builtin import BUILTIN_DIR, build_tokenizer, tiny_config
from profit_ds.model.prompted import client_loss_sums, collate, encode
from transformers import LlamaForCausalLM

PRETRAIN_SEED = 777  # runs use the suite's default seed (1234): no instance overlap by seed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--instances-per-task", type=int, default=2000)
    ap.add_argument("--generic-fraction", type=float, default=0.25)
    ap.add_argument("--out", type=Path, default=BUILTIN_DIR)
    args = ap.parse_args()

    torch.manual_seed(0)
    rng = random.Random(0)
    tasks = builtin_tasks(instances_per_task=args.instances_per_task, seed=PRETRAIN_SEED)
    examples = [(k, to_example(t, inst)) for k, t in enumerate(tasks) for inst in t.instances]
    texts = [e.source + " " + " ".join(e.references) for _, e in examples]
    tokenizer = build_tokenizer(texts)
    encoded = encode(tokenizer, [e for _, e in examples])
    model = LlamaForCausalLM(tiny_config(len(tokenizer)))
    generic = len(tasks)
    prefixes = torch.nn.Parameter(torch.randn(len(tasks) + 1, args.prompt_tokens,
                                              model.config.hidden_size) * 0.5)
    params = list(model.parameters()) + [prefixes]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(tasks)} tasks, {len(encoded)} examples, vocab {len(tokenizer)}, "
          f"{n_params / 1e6:.2f}M backbone parameters")

    order: list[int] = []
    start = time.time()
    for step in range(1, args.steps + 1):
        if len(order) < args.batch:
            order += rng.sample(range(len(encoded)), len(encoded))
        rows, order = order[: args.batch], order[args.batch:]
        owners = [generic if rng.random() < args.generic_fraction else examples[i][0] for i in rows]
        batch = collate([encoded[i] for i in rows], owners, tokenizer.pad_token_id)
        lr = args.lr * min(1.0, step / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16):
            sums = client_loss_sums(model, prefixes, batch)
        loss = sums.sum() / (batch.labels != -100).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 100 == 0 or step == 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  "
                  f"{time.time() - start:6.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
