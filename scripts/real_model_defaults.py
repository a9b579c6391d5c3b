"""How profit-ds's defaults for a pretrained backbone were found (config.REAL_MODEL_DEFAULTS):
measurements on SmolLM2-135M-Instruct and the real SNI sample, printed as the tables of
docs/REAL_MODEL.md.

  format       the bare backbone and initial prompts (init x P), with and without the chat
               template, at source limits 256 and 1024: global ROUGE-L over every client's
               local test set (all 48 clients: 231 examples), the prompt untrained.
  personalize  personalization from the text-initialized prompt on 4 test clients for 2
               epochs, a grid of SGD and Adam learning rates: local and global ROUGE-L.

    python scripts/real_model_defaults.py --part format        (about 15 min on 2 cores)
    python scripts/real_model_defaults.py --part personalize   (about 40 min)
"""
from __future__ import annotations

import argparse
import time

import torch

SNI = "../shared/sni-sample/tasks"
PHRASE = "Follow the instruction and answer the question."
INITS = ("none", "vocab:20", "text:8", "text:20", "text:100", "vocab:100")


def setup(chat: bool, max_source: int, data: str):
    from profit_ds.config import build
    from profit_ds.data.for_run import load_tasks, run_partition
    from profit_ds.runner import set_up

    cfg = build(dict(model="smollm2-135m", data=data, max_per_client=24, clients_per_round=4,
                     chat_template=chat, max_source_tokens=max_source))
    return cfg, set_up(cfg, run_partition(cfg, load_tasks(cfg)))


def initial(setup, init: str) -> torch.Tensor:
    """`none` (the bare backbone: no prompt), `vocab:P` or `text:P` as init_prompt makes them."""
    from profit_ds.model.backbone import init_prompt

    if init == "none":
        return torch.zeros(0, setup.backbone.hidden_size)
    kind, p = init.split(":")
    return init_prompt(setup.backbone, int(p), kind, seed=0, text=PHRASE)


def format_table(data: str) -> list[str]:
    from profit_ds.evaluation.generate import evaluate

    lines = ["| chat template | max source tokens | prompt | global ROUGE-L | s |",
             "|---|---:|---|---:|---:|"]
    for chat, max_source in ((False, 256), (True, 256), (True, 1024)):
        _, s = setup(chat, max_source, data)
        clients = s.data.train_clients + s.data.validation_clients + s.data.test_clients
        sets = [c.test for c in clients]
        for init in INITS if (chat, max_source) == (True, 1024) else INITS[:4]:
            t = time.perf_counter()
            res = evaluate(s.backbone, {"prompt": initial(s, init).unsqueeze(0)}, [(0, x) for x in sets],
                           s.new_tokens, s.budgets.generation_rows)
            n = [len(x) for x in sets]
            score = sum(r["rouge_l"] * k for r, k in zip(res, n)) / sum(n)
            lines.append(f"| {'on' if chat else 'off'} | {max_source} | {init} | {score:.2f} | "
                         f"{time.perf_counter() - t:.0f} |")
            print(lines[-1], flush=True)
    return lines


def personalize_table(data: str) -> list[str]:
    from profit_ds.evaluation.generate import evaluate
    from profit_ds.fl.optim import ClientOptimizer
    from profit_ds.fl.personalize import PersonalizeSpec, personalize, summarize

    cfg, s = setup(True, 1024, data)
    prompt = initial(s, f"text:{cfg.prompt_tokens}")
    clients = s.data.test_clients[:4]

    def score(bank, requests, tags=()):
        return evaluate(s.backbone, bank, requests, s.new_tokens,
                        s.budgets.generation_rows)

    base = score({"prompt": prompt.unsqueeze(0)},
                 [(0, c.test) for c in clients] + [(0, s.data.global_test)])
    lines = ["| optimizer | lr | epoch | local ROUGE-L | global ROUGE-L | train loss |",
             "|---|---:|---:|---:|---:|---:|",
             f"| (initial prompt) | | 0 | {sum(b['rouge_l'] for b in base[:-1]) / len(clients):.2f}"
             f" | {base[-1]['rouge_l']:.2f} | |"]
    print(lines[-1], flush=True)
    for opt, lrs in (("sgd", (0.1, 0.3, 1.0, 3.0)), ("adam", (0.001, 0.003, 0.01, 0.03))):
        spec = PersonalizeSpec(ClientOptimizer(opt), lrs, 2, cfg.batch_size, cfg.seed)
        records, _ = personalize(s.backbone, {"prompt": prompt}, clients, s.data.global_test,
                                 spec, len(clients) * len(lrs), score)
        for r in summarize(records):
            lines.append(f"| {opt} | {r['lr']:g} | {r['epoch']} | {r['local_rouge_l']:.2f} | "
                         f"{r['global_rouge_l']:.2f} | {r['train_loss']:.3f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("format", "personalize", "all"), default="all")
    parser.add_argument("--data", default=SNI)
    args = parser.parse_args()
    if args.part in ("format", "all"):
        print("\n".join(format_table(args.data)))
    if args.part in ("personalize", "all"):
        print("\n".join(personalize_table(args.data)))


if __name__ == "__main__":
    main()
