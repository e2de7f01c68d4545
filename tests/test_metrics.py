"""metrics.py on hand-made cases whose answers are known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from metrics import (
    f1_score,
    glue_metrics,
    normalize_answer,
    exact_match_score,
    seqeval_metrics,
    squad_evaluate,
    squad_v2_evaluate,
)


# -------------------------------------------------------------------------------------------- SQuAD


def test_normalize_answer_follows_the_official_script():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("  Theory  ") == "theory"  # 'the' only as a whole word
    assert normalize_answer("") == ""


def test_exact_match_and_f1_per_pair():
    assert exact_match_score("the Cat.", "cat") == 1
    assert exact_match_score("black cat", "cat") == 0
    # prediction "black cat sat" vs gold "the cat sat down": common {cat, sat}: P=2/3, R=2/3.
    assert f1_score("black cat sat", "the cat sat down") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0.0
    assert f1_score("", "") == 1.0 and f1_score("", "cat") == 0.0 and f1_score("the", "") == 1.0


def test_squad_v1_takes_the_best_gold_answer():
    references = [
        {"id": "1", "answers": {"text": ["Denver Broncos", "The Broncos"], "answer_start": [0, 5]}},
        {"id": "2", "answers": {"text": ["Santa Clara, California"], "answer_start": [3]}},
        {"id": "3", "answers": ["1966"]},
    ]
    predictions = {"1": "broncos", "2": "Santa Clara", "3": "in 1967"}
    scores = squad_evaluate(predictions, references)
    # q1: EM 1 against "The Broncos"; q2: P=1, R=2/3 -> F1 0.8; q3: 0.
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 0) / 3)
    with pytest.raises(ValueError, match="no gold answer"):
        squad_evaluate({"4": ""}, [{"id": "4", "answers": {"text": [], "answer_start": []}}])
    with pytest.raises(ValueError, match="no prediction"):
        squad_evaluate({}, references[:1])


def test_squad_v2_scores_no_answer_questions():
    references = [
        {"id": "a", "answers": {"text": ["Paris"], "answer_start": [0]}},
        {"id": "b", "answers": {"text": ["blue sky", "sky"], "answer_start": [0, 5]}},
        {"id": "c", "answers": {"text": [], "answer_start": []}},
        {"id": "d", "answers": {"text": [], "answer_start": []}},
    ]
    predictions = {"a": "paris", "b": "the sky is blue", "c": "", "d": "London"}
    scores = squad_v2_evaluate(predictions, references)
    # b: "sky is blue" vs "blue sky": 2 common tokens, P=2/3, R=1 -> F1 0.8 (vs "sky": 0.5).
    assert scores["HasAns_exact"] == pytest.approx(50.0)
    assert scores["HasAns_f1"] == pytest.approx(100 * (1 + 0.8) / 2)
    assert scores["NoAns_exact"] == pytest.approx(50.0) and scores["NoAns_f1"] == pytest.approx(50.0)
    assert scores["exact"] == pytest.approx(50.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 0.8 + 1 + 0) / 4)
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (4, 2, 2)
    only_answerable = squad_v2_evaluate({"a": "Paris"}, references[:1])
    assert "NoAns_exact" not in only_answerable and only_answerable["exact"] == 100.0


# --------------------------------------------------------------------------------------------- GLUE


def test_glue_metrics_per_task():
    preds, labels = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]
    # TP=2 FP=1 FN=1 TN=2: accuracy 4/6, F1 2/3, MCC (2*2-1*1)/sqrt(3*3*3*3) = 1/3.
    assert glue_metrics("cola", preds, labels) == {"matthews_correlation": pytest.approx(1 / 3)}
    mrpc = glue_metrics("mrpc", preds, labels)
    assert mrpc["accuracy"] == pytest.approx(4 / 6) and mrpc["f1"] == pytest.approx(2 / 3)
    assert mrpc["combined_score"] == pytest.approx((4 / 6 + 2 / 3) / 2)
    assert set(glue_metrics("qqp", preds, labels)) == {"accuracy", "f1", "combined_score"}
    for task in ("mnli", "qnli", "rte", "sst2", "wnli"):
        assert glue_metrics(task, [0, 2, 1], [0, 2, 2]) == {"accuracy": pytest.approx(2 / 3)}
    stsb = glue_metrics("stsb", np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0]))
    assert stsb["pearson"] == pytest.approx(0.8) and stsb["spearmanr"] == pytest.approx(0.8)
    assert glue_metrics(None, [0, 1], [0, 0]) == {"accuracy": 0.5}
    custom = glue_metrics(None, [1.0, 3.0], [2.0, 3.0], is_regression=True)
    assert custom["mse"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown GLUE task"):
        glue_metrics("sst5", [0], [0])


def test_degenerate_correlations_are_nan_not_errors():
    assert math.isnan(glue_metrics("stsb", [1.0, 1.0, 1.0], [0.0, 1.0, 2.0])["pearson"])
    assert glue_metrics("cola", [1, 1, 1], [0, 1, 0])["matthews_correlation"] == 0.0


# ---------------------------------------------------------------------------------------------- NER


def test_seqeval_entity_scores():
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "O", "B-LOC"]]
    # Gold entities: PER, LOC, ORG(1-2). Predicted: PER (right), ORG(1) (wrong span), LOC(3) (wrong).
    scores = seqeval_metrics(predictions, references, entity_level=True)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)
    assert scores["accuracy"] == pytest.approx(5 / 8)
    assert scores["PER_f1"] == 1.0 and scores["ORG_f1"] == 0.0 and scores["LOC_number"] == 1
    assert seqeval_metrics(references, references)["f1"] == 1.0
    with pytest.raises(ValueError, match="sentence 0"):
        seqeval_metrics([["O"]], [["O", "O"]])
