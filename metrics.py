"""Evaluation metrics computed offline: GLUE, SQuAD v1/v2 EM and F1, and a seqeval wrapper for NER.

Every function here is a pure function of predictions and references (plain Python or NumPy),
so the fine-tuning scripts never need the `evaluate` library or a hub download. Scores keep the
units of the reference implementations: GLUE and seqeval in [0, 1], SQuAD in percent.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Mapping, Sequence

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)
GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")


# ----------------------------------------------------------------------------------------- GLUE


def accuracy(preds: Sequence, labels: Sequence) -> float:
    """Fraction of positions where `preds` equals `labels`."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean())


def binary_f1(preds: Sequence[int], labels: Sequence[int]) -> float:
    """F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return float(f1_score(np.asarray(labels), np.asarray(preds), pos_label=1, average="binary", zero_division=0))


def matthews_correlation(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient (CoLA's metric); 0.0 when either side is constant."""
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(np.asarray(labels), np.asarray(preds)))


def pearson_spearman(preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """Pearson and Spearman correlations (STS-B's metrics); NaN when either side is constant."""
    from scipy.stats import pearsonr, spearmanr

    preds, labels = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if len(preds) < 2 or np.all(preds == preds[0]) or np.all(labels == labels[0]):
        return {"pearson": float("nan"), "spearmanr": float("nan")}
    return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}


def glue_metrics(task: str | None, preds: Sequence, labels: Sequence, is_regression: bool = False) -> dict[str, float]:
    """The GLUE metrics of `task` for label predictions (class ids, or scores for STS-B).

    cola: matthews_correlation; mrpc, qqp: accuracy and f1 (positive class); stsb: pearson and
    spearmanr; mnli, qnli, rte, sst2, wnli: accuracy. Tasks with two metrics also get
    `combined_score`, their mean, as HF's run_glue.py reports. `task=None` (custom data) gives
    accuracy, or mse plus the correlations when `is_regression`. Raises ValueError on an unknown task.
    """
    if task is None:
        if is_regression:
            preds_f, labels_f = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
            return {"mse": float(((preds_f - labels_f) ** 2).mean()), **pearson_spearman(preds_f, labels_f)}
        return {"accuracy": accuracy(preds, labels)}
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; choose from {', '.join(GLUE_TASKS)}")
    if task == "cola":
        return {"matthews_correlation": matthews_correlation(preds, labels)}
    if task == "stsb":
        result = pearson_spearman(preds, labels)
    elif task in ("mrpc", "qqp"):
        result = {"accuracy": accuracy(preds, labels), "f1": binary_f1(preds, labels)}
    else:
        return {"accuracy": accuracy(preds, labels)}
    result["combined_score"] = float(np.mean(list(result.values())))
    return result


# ---------------------------------------------------------------------------------------- SQuAD


def normalize_answer(text: str) -> str:
    """The official SQuAD normalisation: lower-case, drop punctuation and a/an/the, squeeze whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match_score(prediction: str, gold: str) -> int:
    """1 if the normalised strings are equal, else 0."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 between normalised strings; if either is empty, 1.0 only when both are."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_texts(answers) -> list[str]:
    """Gold answer strings from HF's `{"text": [...], ...}` or a plain list of strings."""
    if isinstance(answers, Mapping):
        answers = answers.get("text", [])
    return [a for a in answers if normalize_answer(a)]


def squad_evaluate(predictions: Mapping[str, str], references: Iterable[Mapping]) -> dict[str, float]:
    """SQuAD v1.1 scores in percent: `exact_match` and `f1`, each the max over a question's gold answers.

    `predictions` maps question id to predicted text; each reference has `id` and `answers`
    (HF format `{"text": [...], "answer_start": [...]}` or a list of strings). Every reference
    must have at least one gold answer (use `squad_v2_evaluate` for unanswerable questions) and a
    prediction. Raises ValueError otherwise.
    """
    em = f1 = 0.0
    total = 0
    for ref in references:
        qid = ref["id"]
        golds = _gold_texts(ref["answers"])
        if not golds:
            raise ValueError(f"question {qid!r} has no gold answer; score it with squad_v2_evaluate")
        if qid not in predictions:
            raise ValueError(f"no prediction for question {qid!r}")
        pred = predictions[qid]
        em += max(exact_match_score(pred, g) for g in golds)
        f1 += max(f1_score(pred, g) for g in golds)
        total += 1
    if total == 0:
        raise ValueError("no references to score")
    return {"exact_match": 100.0 * em / total, "f1": 100.0 * f1 / total}


def squad_v2_evaluate(predictions: Mapping[str, str], references: Iterable[Mapping]) -> dict[str, float]:
    """SQuAD v2.0 scores in percent, as the official script names them.

    A question without gold answers is unanswerable: its only gold is the empty string, so an empty
    prediction scores 1 on both EM and F1. Returns `exact`, `f1`, `total` and the same three for
    the `HasAns_` and `NoAns_` subsets (a subset's keys are left out when it is empty).
    """
    scores = {True: [], False: []}  # has_answer -> [(em, f1)]
    for ref in references:
        qid = ref["id"]
        if qid not in predictions:
            raise ValueError(f"no prediction for question {qid!r}")
        golds = _gold_texts(ref["answers"])
        has_answer = bool(golds)
        golds = golds or [""]
        pred = predictions[qid]
        scores[has_answer].append(
            (max(exact_match_score(pred, g) for g in golds), max(f1_score(pred, g) for g in golds))
        )
    everything = scores[True] + scores[False]
    if not everything:
        raise ValueError("no references to score")

    def _summary(pairs, prefix=""):
        return {
            f"{prefix}exact": 100.0 * sum(p[0] for p in pairs) / len(pairs),
            f"{prefix}f1": 100.0 * sum(p[1] for p in pairs) / len(pairs),
            f"{prefix}total": len(pairs),
        }

    result = _summary(everything)
    if scores[True]:
        result.update(_summary(scores[True], "HasAns_"))
    if scores[False]:
        result.update(_summary(scores[False], "NoAns_"))
    return result


# ------------------------------------------------------------------------------------------ NER


def seqeval_metrics(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], entity_level: bool = False
) -> dict[str, float]:
    """Entity-level precision, recall and F1 and token accuracy with seqeval (CoNLL conventions).

    Inputs are lists of tag sequences (`B-PER`, `I-PER`, `O`, ...), one per sentence, of equal
    lengths. With `entity_level`, adds `<TYPE>_precision/_recall/_f1/_number` for each entity type.
    """
    from seqeval.metrics import accuracy_score, classification_report, f1_score as seq_f1, precision_score, recall_score

    predictions = [list(p) for p in predictions]
    references = [list(r) for r in references]
    for i, (p, r) in enumerate(zip(predictions, references)):
        if len(p) != len(r):
            raise ValueError(f"sentence {i}: {len(p)} predicted tags for {len(r)} gold tags")
    result = {
        "precision": float(precision_score(references, predictions, zero_division=0)),
        "recall": float(recall_score(references, predictions, zero_division=0)),
        "f1": float(seq_f1(references, predictions, zero_division=0)),
        "accuracy": float(accuracy_score(references, predictions)),
    }
    if entity_level:
        report = classification_report(references, predictions, output_dict=True, zero_division=0)
        for entity, values in report.items():
            if entity.endswith(" avg"):
                continue
            result[f"{entity}_precision"] = float(values["precision"])
            result[f"{entity}_recall"] = float(values["recall"])
            result[f"{entity}_f1"] = float(values["f1-score"])
            result[f"{entity}_number"] = int(values["support"])
    return result
