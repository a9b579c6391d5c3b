"""ROUGE-L and exact match exactly as Super-NaturalInstructions scores them.

SNI's `compute_metrics.py`: rouge-score's `rougeL` F-measure with the Porter stemmer, the max over
an example's references, the mean over examples, times 100. Exact match compares SQuAD-normalized
strings (lower case, no punctuation, no articles, single spaces), also max over references.
"""
from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Iterable, Sequence

from rouge_score import rouge_scorer


@lru_cache(maxsize=1)
def _scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Best ROUGE-L F-measure (0-1) of `prediction` against any of `references`."""
    return max(_scorer().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def normalize_answer(text: str) -> str:
    """SQuAD normalization, as SNI uses for exact match."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(r) for r in references))


def score_predictions(predictions: Sequence[str], references: Iterable[Sequence[str]],
                      per_example: bool = False) -> dict:
    """Mean ROUGE-L and exact match on SNI's 0-100 scale, plus the example count; with
    `per_example`, also each example's ROUGE-L (0-100) under "example_rouge_l"."""
    references = list(references)
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    n = len(predictions)
    rls = [rouge_l(p, r) for p, r in zip(predictions, references)]
    em = sum(exact_match(p, r) for p, r in zip(predictions, references))
    out = {"rouge_l": 100.0 * sum(rls) / n if n else 0.0,
           "exact_match": 100.0 * em / n if n else 0.0, "n": n}
    if per_example:
        out["example_rouge_l"] = [100.0 * x for x in rls]
    return out
