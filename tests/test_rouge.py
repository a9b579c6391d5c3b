"""ROUGE-L must equal rouge-score's rougeL F-measure (Porter stemming) exactly as SNI uses it."""
import json
import subprocess
import sys

import pytest
from rouge_score import rouge_scorer

from profit_ds.evaluation.rouge import exact_match, rouge_l, score_predictions

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

CASES = [
    ("the cats are running", ["The cat is running."]),              # stemming + punctuation
    ("Running quickly!", ["runs quick", "ran quickly"]),           # max over references
    ("", ["something"]),                                             # empty prediction
    ("positive", ["positive"]),
    ("a b c d e", ["e d c b a", "a x c y e"]),                     # order matters (LCS)
    ("New-York, U.S.A.", ["new york usa", "New York, U.S.A."]),
    ("43, 75", ["43, 75"]),
    ("the garden", ["garden", "the garden"]),
]


@pytest.mark.parametrize("prediction,references", CASES)
def test_rouge_l_matches_rouge_score(prediction, references):
    expected = max(SCORER.score(r, prediction)["rougeL"].fmeasure for r in references)
    assert rouge_l(prediction, references) == pytest.approx(expected, abs=1e-12)


def test_mean_over_examples_on_sni_scale():
    preds = [p for p, _ in CASES]
    refs = [r for _, r in CASES]
    expected = 100 * sum(max(SCORER.score(r, p)["rougeL"].fmeasure for r in rs)
                         for p, rs in CASES) / len(CASES)
    result = score_predictions(preds, refs)
    assert result["rouge_l"] == pytest.approx(expected)
    assert result["n"] == len(CASES)
    assert 0 < result["rouge_l"] < 100


def test_exact_match_normalizes_like_squad():
    assert exact_match("The Garden.", ["garden"]) == 1.0
    assert exact_match("garden shed", ["garden"]) == 0.0
    assert exact_match("", ["x", ""]) == 1.0


def test_score_command_json(tmp_path):
    f = tmp_path / "preds.jsonl"
    f.write_text("\n".join(json.dumps({"prediction": p, "references": r}) for p, r in CASES))
    out = subprocess.run([sys.executable, "-m", "profit_ds", "score", str(f), "--json"],
                         capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    assert got == pytest.approx(score_predictions([p for p, _ in CASES], [r for _, r in CASES]))


def test_score_command_bad_line_exit_2(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prediction": "a", "references": ["a"]}\n{"prediction": 3, "references": ["a"]}\n')
    out = subprocess.run([sys.executable, "-m", "profit_ds", "score", str(f)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert f"{f}:2" in out.stderr and "prediction" in out.stderr
    assert "Traceback" not in out.stderr
