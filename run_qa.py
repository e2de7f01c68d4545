#!/usr/bin/env python
"""Fine-tune and evaluate a model on extractive question answering (SQuAD v1.1 / v2.0, hub or local json).

    python run_qa.py --model_name_or_path ./student --tokenizer_name bert-base-uncased \
        --train_file squad_train.json --validation_file squad_dev.json \
        --do_train --do_eval --max_seq_length 384 --doc_stride 128 --output_dir ./qa_results

Local files are either HF's flattened format (one row per question: id, title, context, question,
answers{text, answer_start}; json or json lines) or the official nested SQuAD json
({"data": [{"paragraphs": [{"context", "qas": [...]}]}]}), which is flattened on reading. Long
contexts are split into windows of --max_seq_length tokens overlapping by --doc_stride; the best
span over all windows is the prediction. Writes predictions.json (question id -> answer text).
"""
from __future__ import annotations

import collections
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune_common import (FinetuneTrainingArguments, ModelArguments, after_training, check_columns, check_vocab,
                             load_config,
                             load_model, load_split_files, load_tokenizer, make_trainer, padding_collator,
                             resolve_max_length, save_metrics, start, take, train_and_save)
from finetune_common import finetune_main
from metrics import normalize_answer, squad_evaluate, squad_v2_evaluate
from atomic_files import atomic_write_text
from utils import CliError, require_file, run_cli

logger = logging.getLogger("causal_distill.run_qa")


@dataclass
class QaDataArguments:
    """Which data to fine-tune and evaluate on, and how contexts are windowed and answers decoded."""

    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset name: squad or squad_v2."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data (SQuAD json, flattened or nested)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation data (SQuAD json)."})
    test_file: str | None = field(default=None, metadata={"help": "Local data to answer with --do_predict (SQuAD json)."})
    max_seq_length: int = field(default=384, metadata={"help": "Tokens per window (question + context piece)."})
    doc_stride: int = field(default=128, metadata={"help": "Tokens of overlap between consecutive context windows."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every window to --max_seq_length instead of to the longest in the batch."}
    )
    n_best_size: int = field(default=20, metadata={"help": "Start and end candidates considered per window."})
    max_answer_length: int = field(default=30, metadata={"help": "The longest answer, in tokens, that may be predicted."})
    version_2_with_negative: bool = field(
        default=False,
        metadata={"help": "SQuAD v2: some questions have no answer (set automatically for --dataset_name squad_v2)."},
    )
    null_score_diff_threshold: float = field(
        default=0.0,
        metadata={"help": "v2: predict no answer when null score - best span score exceeds this threshold."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training questions."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation questions."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only the first N test questions."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenized datasets."})

    def __post_init__(self):
        if self.dataset_name and self.dataset_name.split("/")[-1] == "squad_v2":
            self.version_2_with_negative = True
        for flag in ("n_best_size", "max_answer_length", "max_seq_length"):
            if getattr(self, flag) < 1:  # 0 best candidates: every prediction empty, scored without a word
                raise CliError(f"--{flag} must be >= 1, not {getattr(self, flag)}")
        if self.doc_stride <= 0 or self.doc_stride >= self.max_seq_length:
            raise CliError(f"--doc_stride {self.doc_stride} must be positive and below --max_seq_length {self.max_seq_length}")


def flatten_squad(data: list) -> list[dict]:
    """Rows (id, title, context, question, answers) from the official nested SQuAD `data` list."""
    rows = []
    for article in data:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                answers = [] if qa.get("is_impossible") else qa.get("answers", [])
                rows.append(
                    {
                        "id": str(qa["id"]),
                        "title": article.get("title", ""),
                        "context": paragraph["context"],
                        "question": qa["question"],
                        "answers": {
                            "text": [a["text"] for a in answers],
                            "answer_start": [int(a["answer_start"]) for a in answers],
                        },
                    }
                )
    return rows


def load_squad_file(path: str, split: str):
    """One SQuAD-format json file (nested official format, `{"data": rows}`, a list of rows, or json lines)."""
    from datasets import Dataset, Features, Sequence, Value

    p = require_file(path, f"the {split} file")
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, IsADirectoryError) as err:  # a PNG, a folder: not json
        raise CliError(f"{p} is not SQuAD json ({type(err).__name__})") from None
    try:
        loaded = json.loads(text)
        records = loaded.get("data", loaded) if isinstance(loaded, dict) else loaded
        if isinstance(records, dict):
            records = [records]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise CliError(f"{p} is not SQuAD json (nor json lines): {err}") from None
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise CliError(f"{p}: expected SQuAD json: a list of questions or {{\"data\": [...]}}")
    if records and "paragraphs" in records[0]:
        records = flatten_squad(records)
    columns = sorted({k for r in records for k in r})
    missing = [c for c in ("id", "context", "question") if c not in columns]
    if missing:
        raise CliError(f"{p} lacks the column(s) {', '.join(missing)} (it has: {', '.join(columns)})")
    rows = []
    for r in records:
        answers = r.get("answers")
        if isinstance(answers, list):  # [{"text", "answer_start"}, ...]
            answers = {"text": [a["text"] for a in answers], "answer_start": [int(a["answer_start"]) for a in answers]}
        row = {"id": str(r["id"]), "title": str(r.get("title", "")), "context": r["context"], "question": r["question"]}
        if answers is not None:
            row["answers"] = {"text": list(answers["text"]), "answer_start": [int(x) for x in answers["answer_start"]]}
        rows.append(row)
    features = {k: Value("string") for k in ("id", "title", "context", "question")}
    if all("answers" in r for r in rows):
        features["answers"] = {"text": Sequence(Value("string")), "answer_start": Sequence(Value("int32"))}
    else:
        rows = [{k: v for k, v in r.items() if k != "answers"} for r in rows]
    return Dataset.from_list(rows, features=Features(features))


def tokenize_windows(batch, tokenizer, max_seq_length: int, doc_stride: int, padding=False):
    """Question + context windows of `max_seq_length` tokens overlapping by `doc_stride` (offsets kept)."""
    questions = [q.lstrip() for q in batch["question"]]
    pad_on_right = tokenizer.padding_side == "right"
    first, second = (questions, batch["context"]) if pad_on_right else (batch["context"], questions)
    return tokenizer(
        first,
        second,
        truncation="only_second" if pad_on_right else "only_first",
        max_length=max_seq_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=padding,
    )


def prepare_train_features(batch, tokenizer, max_seq_length: int, doc_stride: int, padding=False):
    """Training windows labelled with the answer's first and last token (CLS when the window lacks it)."""
    encoded = tokenize_windows(batch, tokenizer, max_seq_length, doc_stride, padding)
    sample_map = encoded.pop("overflow_to_sample_mapping")
    offsets_all = encoded.pop("offset_mapping")
    context_id = 1 if tokenizer.padding_side == "right" else 0
    encoded["start_positions"], encoded["end_positions"] = [], []
    for i, offsets in enumerate(offsets_all):
        input_ids = encoded["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        sequence_ids = encoded.sequence_ids(i)
        answers = batch["answers"][sample_map[i]]
        start, end = cls_index, cls_index
        if answers["answer_start"]:
            start_char = answers["answer_start"][0]
            end_char = start_char + len(answers["text"][0])
            context = [k for k, sid in enumerate(sequence_ids) if sid == context_id]
            if offsets[context[0]][0] <= start_char and offsets[context[-1]][1] >= end_char:
                start = max(k for k in context if offsets[k][0] <= start_char)
                end = min(k for k in context if offsets[k][1] >= end_char)
        encoded["start_positions"].append(start)
        encoded["end_positions"].append(end)
    return encoded


def prepare_eval_features(batch, tokenizer, max_seq_length: int, doc_stride: int, padding=False):
    """Evaluation windows with `example_id` and an `offset_mapping` that is None outside the context."""
    encoded = tokenize_windows(batch, tokenizer, max_seq_length, doc_stride, padding)
    sample_map = encoded.pop("overflow_to_sample_mapping")
    context_id = 1 if tokenizer.padding_side == "right" else 0
    encoded["example_id"] = []
    for i in range(len(encoded["input_ids"])):
        sequence_ids = encoded.sequence_ids(i)
        encoded["example_id"].append(batch["id"][sample_map[i]])
        encoded["offset_mapping"][i] = [
            o if sequence_ids[k] == context_id else None for k, o in enumerate(encoded["offset_mapping"][i])
        ]
    return encoded


def postprocess_predictions(
    examples, features, start_logits, end_logits, *, version_2_with_negative: bool, n_best_size: int,
    max_answer_length: int, null_score_diff_threshold: float
) -> tuple[dict, dict]:
    """Answer text per question from the windows' start/end logits.

    For every window of a question, the `n_best_size` best starts and ends form candidate spans
    inside the context (offsets not None), at most `max_answer_length` tokens long; the best-scoring
    (start + end logit) span over all windows wins. With `version_2_with_negative` the question is
    unanswered ("") when the smallest window null score (CLS start + end) beats the best span by
    more than `null_score_diff_threshold`. Returns `(predictions, null_score_diffs)` keyed by id.
    """
    windows = collections.defaultdict(list)
    for index, example_id in enumerate(list(features["example_id"])):
        windows[example_id].append(index)
    offsets_all = list(features["offset_mapping"])
    predictions, null_diffs = {}, {}
    for example in examples:
        qid, context = example["id"], example["context"]
        min_null_score = None
        candidates = []
        for index in windows[qid]:
            starts, ends, offsets = start_logits[index], end_logits[index], offsets_all[index]
            null_score = float(starts[0] + ends[0])
            if min_null_score is None or null_score < min_null_score:
                min_null_score = null_score
            length = len(offsets)
            best_starts = np.argsort(starts[:length])[-1 : -n_best_size - 1 : -1]
            best_ends = np.argsort(ends[:length])[-1 : -n_best_size - 1 : -1]
            for s in best_starts:
                for e in best_ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    candidates.append((float(starts[s] + ends[e]), offsets[s][0], offsets[e][1]))
        candidates.sort(key=lambda c: c[0], reverse=True)
        best = next(((score, context[a:b]) for score, a, b in candidates if context[a:b].strip()), None)
        if not version_2_with_negative:
            predictions[qid] = best[1] if best else ""
            continue
        if best is None:
            predictions[qid], null_diffs[qid] = "", float("inf")
            continue
        diff = (min_null_score if min_null_score is not None else float("-inf")) - best[0]
        null_diffs[qid] = diff
        predictions[qid] = "" if diff > null_score_diff_threshold else best[1]
    return predictions, null_diffs


# The command line: HfArgumentParser over these dataclasses.
ARGUMENTS = (ModelArguments, QaDataArguments, FinetuneTrainingArguments)


@finetune_main
def main(argv: list[str] | None = None) -> dict:
    """Fine-tune, evaluate and/or predict as the command line `argv` asks; returns all metrics."""
    from transformers import AutoModelForQuestionAnswering

    model_args, data_args, training_args, checkpoint = start(ARGUMENTS, argv, __doc__)
    raw, sources, used = load_data(data_args, training_args, model_args.cache_dir)
    tokenizer = load_tokenizer(model_args)
    if not getattr(tokenizer, "is_fast", False):
        raise CliError(f"run_qa.py needs a fast tokenizer (offset mapping); {type(tokenizer).__name__} is not one")
    config = load_config(model_args)
    check_vocab(tokenizer, config, model_args)
    model = load_model(AutoModelForQuestionAnswering, model_args, config)
    max_seq_length = resolve_max_length(data_args.max_seq_length, tokenizer, config)
    check_windows_fit(raw, sources, used, tokenizer, max_seq_length, data_args.doc_stride)
    limits = {"train": data_args.max_train_samples, "validation": data_args.max_eval_samples, "test": data_args.max_predict_samples}
    examples = {split: take(raw[split], limits[split]) for split in used}
    features = windows(examples, tokenizer, max_seq_length, data_args, training_args)
    trainer = make_trainer(model, training_args, tokenizer,
                           padding_collator(tokenizer, training_args, data_args.pad_to_max_length),
                           train_dataset=features.get("train"))
    results = train_and_save(trainer, checkpoint, features.get("train"))
    with after_training(training_args):  # an evaluation that fails never costs the training run
        if training_args.do_eval:
            metrics = answer(trainer, examples["validation"], features["validation"], "eval", data_args)
            if trainer.state.epoch is not None:
                metrics["epoch"] = trainer.state.epoch
            save_metrics(training_args.output_dir, "eval", metrics, trainer.is_world_process_zero())
            results.update(metrics)
        if training_args.do_predict:
            metrics = answer(trainer, examples["test"], features["test"], "predict", data_args)
            save_metrics(training_args.output_dir, "predict", metrics, trainer.is_world_process_zero())
            results.update(metrics)
    return results


def load_data(data_args: QaDataArguments, training_args, cache_dir: str | None) -> tuple[dict, dict, list[str]]:
    """(raw splits, their sources, the splits this run uses); checks columns and, for SQuAD v1, that every question has an answer."""
    raw, sources, used = load_split_files(data_args, training_args, cache_dir, load_squad_file)
    for split in used:
        check_columns(raw[split], ["id", "context", "question"] + ([] if split == "test" else ["answers"]), sources[split])
        if "answers" in raw[split].column_names:
            check_answers(raw[split], sources[split])
        if not data_args.version_2_with_negative and "answers" in raw[split].column_names:
            unanswerable = sum(1 for a in raw[split]["answers"] if not a["text"])
            if unanswerable:
                raise CliError(
                    f"{sources[split]} has {unanswerable} question(s) without an answer (SQuAD v2 style): "
                    "pass --version_2_with_negative"
                )
    return raw, sources, used


def check_answers(dataset, source: str) -> None:
    """Every gold answer lies in its context where answer_start says, and scores: CliError naming the file and the
    question otherwise (checked before any training, so a bad answer never costs a training run).

    An answer that normalises to nothing ("the", "--": SQuAD drops articles and punctuation) can never be
    matched; one whose text is not at answer_start would train the model on the wrong span."""
    for row in dataset:
        qid, context, answers = row["id"], row["context"], row["answers"]
        texts, starts = answers["text"], answers["answer_start"]
        if len(texts) != len(starts):
            raise CliError(f"{source}, question {qid!r}: {len(texts)} answer texts for {len(starts)} answer_start values")
        for text, at in zip(texts, starts):
            if not 0 <= at <= len(context) - len(text):
                raise CliError(f"{source}, question {qid!r}: answer_start {at} of {text!r} lies beyond its context "
                               f"({len(context)} characters)")
            if context[at:at + len(text)] != text:
                raise CliError(f"{source}, question {qid!r}: the answer {text!r} is not in the context at answer_start "
                               f"{at} (found {context[at:at + len(text)]!r})")
            if not normalize_answer(text):
                raise CliError(f"{source}, question {qid!r}: the answer {text!r} is empty once normalised (SQuAD drops "
                               f"articles, punctuation and spaces), so no prediction could ever match it")


def check_windows_fit(raw, sources: dict, used: list[str], tokenizer, max_seq_length: int, doc_stride: int) -> None:
    """The context windows need room: question + special tokens + stride must fit in a window."""
    for split in used:
        longest = max((len(ids) for ids in tokenizer(list(raw[split]["question"]), add_special_tokens=False)["input_ids"]), default=0)
        room = max_seq_length - longest - tokenizer.num_special_tokens_to_add(pair=True)
        if doc_stride >= room:
            raise CliError(
                f"--doc_stride {doc_stride} leaves no room in --max_seq_length {max_seq_length} windows: the "
                f"longest question in {sources[split]} has {longest} tokens; raise --max_seq_length or lower --doc_stride"
            )


def windows(examples: dict, tokenizer, max_seq_length: int, data_args: QaDataArguments, training_args) -> dict:
    """Each split's context windows: labelled with the answer span for training, with offsets for evaluation."""
    padding = "max_length" if data_args.pad_to_max_length else False
    features = {}
    with training_args.main_process_first(desc="tokenizing"):
        for split, split_examples in examples.items():
            features[split] = split_examples.map(
                prepare_train_features if split == "train" else prepare_eval_features,
                fn_kwargs={"tokenizer": tokenizer, "max_seq_length": max_seq_length, "doc_stride": data_args.doc_stride, "padding": padding},
                batched=True,
                remove_columns=split_examples.column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"windowing {split}",
            )
    return features


def answer(trainer, examples, feats, prefix: str, data_args: QaDataArguments) -> dict:
    """Predict the questions of `examples`, write `<prefix>predictions.json` and return the metrics (when answers are known)."""
    v2 = data_args.version_2_with_negative
    output = trainer.predict(feats.remove_columns(["example_id", "offset_mapping"]), metric_key_prefix=prefix)
    start_logits, end_logits = output.predictions[:2]
    predictions, null_diffs = postprocess_predictions(
        examples,
        feats,
        start_logits,
        end_logits,
        version_2_with_negative=v2,
        n_best_size=data_args.n_best_size,
        max_answer_length=data_args.max_answer_length,
        null_score_diff_threshold=data_args.null_score_diff_threshold,
    )
    out_dir = Path(trainer.args.output_dir)
    name = "predictions.json" if prefix == "eval" else f"{prefix}_predictions.json"
    if trainer.is_world_process_zero():
        atomic_write_text(out_dir / name, json.dumps(predictions, indent=2, ensure_ascii=False))
        if v2:
            atomic_write_text(out_dir / name.replace("predictions", "null_odds"), json.dumps(null_diffs, indent=2))
        logger.info("wrote %d answers to %s", len(predictions), out_dir / name)
    metrics = {k: v for k, v in output.metrics.items() if k.endswith(("_runtime", "_per_second"))}
    if "answers" in examples.column_names:
        references = [{"id": e["id"], "answers": e["answers"]} for e in examples]
        scores = squad_v2_evaluate(predictions, references) if v2 else squad_evaluate(predictions, references)
        metrics.update({f"{prefix}_{k}": v for k, v in scores.items()})
    metrics[f"{prefix}_samples"] = len(examples)
    return metrics


if __name__ == "__main__":
    run_cli(main)
