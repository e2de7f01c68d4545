#!/usr/bin/env python
"""Fine-tune and evaluate a model on a GLUE task (hub or local csv/json files) or on custom sentence(-pair) classification.

    python run_glue.py --model_name_or_path ./student --tokenizer_name bert-base-uncased \
        --task_name sst2 --train_file sst2_train.csv --validation_file sst2_dev.csv \
        --do_train --do_eval --output_dir ./results/sst2

With --task_name alone the data comes from the hub (nyu-mll/glue). With local files, --task_name
names the columns and the metric (sst2: sentence,label; mrpc: sentence1,sentence2,label; ...);
labels may be the task's class ids or names. Without --task_name the sentence columns, the label
set and regression vs. classification are inferred from the training file.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from finetune_common import (FinetuneTrainingArguments, ModelArguments, check_columns, check_vocab, load_config,
                             load_model, load_raw_datasets, load_tokenizer, make_trainer, padding_collator,
                             resolve_max_length, save_metrics, start, take, train_and_save, used_splits)
from finetune_common import finetune_main
from metrics import GLUE_TASKS, glue_metrics
from atomic_files import atomic_write_text
from utils import CliError, run_cli

logger = logging.getLogger("causal_distill.run_glue")

# Task -> (first sentence column, second sentence column or None).
TASK_TO_KEYS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
# Task -> class names in id order, as in the hub's nyu-mll/glue; None for regression (STS-B).
TASK_TO_LABELS = {
    "cola": ["unacceptable", "acceptable"],
    "mnli": ["entailment", "neutral", "contradiction"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qnli": ["entailment", "not_entailment"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "sst2": ["negative", "positive"],
    "stsb": None,
    "wnli": ["not_entailment", "entailment"],
}
assert set(TASK_TO_KEYS) == set(GLUE_TASKS) == set(TASK_TO_LABELS)


@dataclass
class GlueDataArguments:
    """Which task and data to fine-tune and evaluate on."""

    task_name: str | None = field(
        default=None, metadata={"help": "The GLUE task: " + ", ".join(GLUE_TASKS) + ". Chooses the columns and the metric."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Local training data (.csv, .tsv or .json/.jsonl)."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Local evaluation data (.csv, .tsv or .json/.jsonl); MNLI: the matched set."}
    )
    validation_mismatched_file: str | None = field(
        default=None, metadata={"help": "MNLI only: local mismatched evaluation data, evaluated as well."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "Local data to predict with --do_predict (labels not needed)."}
    )
    max_seq_length: int = field(default=128, metadata={"help": "Inputs are truncated to this many tokens."})
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to --max_seq_length instead of to the longest in the batch."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation examples."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only the first N test examples."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenized datasets."})

    def __post_init__(self):
        if self.task_name is not None:
            self.task_name = self.task_name.lower().replace("-", "")
            if self.task_name not in GLUE_TASKS:
                raise CliError(f"unknown --task_name {self.task_name!r}; choose from {', '.join(GLUE_TASKS)}")
        if self.validation_mismatched_file and self.task_name != "mnli":
            raise CliError("--validation_mismatched_file only applies to --task_name mnli")
        if self.task_name is None and not (self.train_file or self.validation_file or self.test_file):
            raise CliError("pass --task_name (a GLUE task) or local data files (--train_file/--validation_file)")


class LabelEncoder:
    """Maps a file's label values to class ids; names the culprit for a label outside the set.

    Values match the label names case-insensitively ("positive", "0" for a name "0"); with
    `accept_ids` (GLUE tasks, whose files may hold ids or names) an integer in range is its own id.
    """

    def __init__(self, names: list, set_name: str, accept_ids: bool):
        self.names = [str(n) for n in names]
        self.set_name = set_name
        self.accept_ids = accept_ids
        self._ids = {n.strip().lower(): i for i, n in enumerate(self.names)}

    def encode(self, value) -> int | None:
        """The class id of `value`, None if it is not in the label set."""
        if value is None or isinstance(value, (bool, np.bool_)):
            return None
        key = str(value).strip().lower()
        if key in self._ids:
            return self._ids[key]
        if self.accept_ids and key.isdigit() and int(key) < len(self.names):
            return int(key)
        return None

    def check(self, dataset, source: str, allow_missing: bool = False) -> None:
        """CliError naming `source` and the first label of `dataset` outside the label set."""
        for value in dataset.unique("label"):
            if allow_missing and (value is None or value == -1):
                continue
            if self.encode(value) is None:
                raise CliError(
                    f"label {value!r} in {source} is not in the label set of {self.set_name}: {', '.join(self.names)}"
                )


def _is_numeric(feature) -> bool:
    from datasets import Value

    return isinstance(feature, Value) and feature.dtype.startswith(("float", "int", "uint"))


def infer_sentence_keys(columns: list[str]) -> tuple[str, str | None]:
    """Without a task: sentence1/sentence2 if present, else the first two non-label, non-id columns."""
    candidates = [c for c in columns if c not in ("label", "idx", "id")]
    if "sentence1" in candidates and "sentence2" in candidates:
        return "sentence1", "sentence2"
    if not candidates:
        raise CliError(f"no text column besides 'label' (columns: {', '.join(columns)})")
    return candidates[0], (candidates[1] if len(candidates) > 1 else None)


# The command line: HfArgumentParser over these dataclasses.
ARGUMENTS = (ModelArguments, GlueDataArguments, FinetuneTrainingArguments)


@finetune_main
def main(argv: list[str] | None = None) -> dict:
    """Fine-tune, evaluate and/or predict as the command line `argv` asks; returns all metrics."""
    model_args, data_args, training_args, checkpoint = start(ARGUMENTS, argv, __doc__)
    data = load_data(data_args, training_args, model_args.cache_dir)
    labels = resolve_columns_and_labels(data, data_args.task_name)
    tokenizer, model, config = load_tokenizer_and_model(model_args, data_args.task_name, labels)
    max_seq_length = resolve_max_length(data_args.max_seq_length, tokenizer, config)
    processed = tokenize(data, labels, tokenizer, max_seq_length, data_args, training_args)
    train_dataset = take(processed["train"], data_args.max_train_samples) if training_args.do_train else None
    trainer = make_trainer(model, training_args, tokenizer,
                           padding_collator(tokenizer, training_args, data_args.pad_to_max_length),
                           train_dataset=train_dataset, compute_metrics=metric_function(data_args.task_name, labels))
    results = train_and_save(trainer, checkpoint, train_dataset)
    if training_args.do_eval:
        results.update(evaluate_splits(trainer, processed, data.eval_splits, data_args.max_eval_samples))
    if training_args.do_predict:
        predict(trainer, processed["test"], data_args, labels)
    return results


def load_data(data_args: GlueDataArguments, training_args, cache_dir: str | None) -> SimpleNamespace:
    """The raw splits (local files or the hub) with their sources, the splits this run uses and the evaluated ones."""
    task = data_args.task_name
    raw, sources = load_raw_datasets(
        data_files={
            "train": data_args.train_file,
            "validation": data_args.validation_file,
            "validation_mismatched": data_args.validation_mismatched_file,
            "test": data_args.test_file,
        },
        dataset_name="nyu-mll/glue" if task else None,
        dataset_config_name=task,
        hub_names=["nyu-mll/glue", "glue"],
        cache_dir=cache_dir,
    )
    if task == "mnli" and "validation_matched" in raw:  # the hub's names
        raw["validation"] = raw["validation_matched"]
        sources["validation"] = sources["validation_matched"]
        if "test_matched" in raw:
            raw["test"] = raw["test_matched"]
            sources["test"] = sources["test_matched"]
    used_splits(raw, training_args)  # each split a --do_* flag asks for is there
    eval_splits = ["validation"] + (["validation_mismatched"] if task == "mnli" and "validation_mismatched" in raw else [])
    used = (["train"] if training_args.do_train else []) + (eval_splits if training_args.do_eval else []) + (
        ["test"] if training_args.do_predict else []
    )
    return SimpleNamespace(raw=raw, sources=sources, used=used, eval_splits=eval_splits)


def resolve_columns_and_labels(data: SimpleNamespace, task: str | None) -> SimpleNamespace:
    """The sentence columns, regression or classification, the label names and their encoder; checks every used split."""
    from datasets import ClassLabel, Value

    raw, sources, used = data.raw, data.sources, data.used
    reference = raw["train"] if "train" in raw else raw[used[0]]
    if task:
        sentence1_key, sentence2_key = TASK_TO_KEYS[task]
    else:
        sentence1_key, sentence2_key = infer_sentence_keys(reference.column_names)
    text_columns = [sentence1_key] + ([sentence2_key] if sentence2_key else [])
    for split in used:
        check_columns(raw[split], text_columns + ([] if split == "test" else ["label"]), sources[split])

    if task:
        is_regression = task == "stsb"
    else:
        if "label" not in reference.column_names:
            raise CliError(f"{sources['train' if 'train' in raw else used[0]]} lacks the column label")
        dtype = reference.features["label"]
        is_regression = isinstance(dtype, Value) and dtype.dtype.startswith("float")
    label_names = None
    encoder = None
    if is_regression:
        for split in used:
            if split != "test" and not _is_numeric(raw[split].features["label"]):
                raise CliError(f"{sources[split]}: the label column must be numeric for regression (task {task or 'custom'})")
    else:
        if task:
            label_names = TASK_TO_LABELS[task]
        elif isinstance(reference.features["label"], ClassLabel):
            label_names = list(reference.features["label"].names)
        else:
            if "train" not in raw:
                raise CliError("without --task_name the label set is read from the training data: pass --train_file")
            label_names = sorted((v for v in raw["train"].unique("label") if v is not None), key=lambda v: (str(type(v)), v))
        set_name = f"task {task}" if task else f"the training data ({sources.get('train')})"
        encoder = LabelEncoder(label_names, set_name, accept_ids=bool(task) or isinstance(reference.features["label"], ClassLabel))
        for split in used:
            encoder.check(raw[split], sources[split], allow_missing=split == "test")
    return SimpleNamespace(sentence1_key=sentence1_key, sentence2_key=sentence2_key, is_regression=is_regression,
                           names=label_names, encoder=encoder)


def load_tokenizer_and_model(model_args: ModelArguments, task: str | None, labels: SimpleNamespace):
    """(tokenizer, sequence-classification model with a head for the label set, its config)."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(model_args)
    config_kwargs = {"num_labels": 1 if labels.is_regression else len(labels.names), "finetuning_task": task}
    if labels.names is not None:
        config_kwargs["id2label"] = {i: str(n) for i, n in enumerate(labels.names)}
        config_kwargs["label2id"] = {str(n): i for i, n in enumerate(labels.names)}
    config = load_config(model_args, **config_kwargs)
    check_vocab(tokenizer, config, model_args)
    model = load_model(AutoModelForSequenceClassification, model_args, config)
    return tokenizer, model, config


def tokenize(data: SimpleNamespace, labels: SimpleNamespace, tokenizer, max_seq_length: int,
             data_args: GlueDataArguments, training_args) -> dict:
    """Each used split tokenized (pairs when there is a second sentence column), with `labels` as class ids or floats."""
    padding = "max_length" if data_args.pad_to_max_length else False

    def preprocess(batch):
        texts = (batch[labels.sentence1_key],) if labels.sentence2_key is None else (
            batch[labels.sentence1_key], batch[labels.sentence2_key])
        result = tokenizer(*texts, padding=padding, max_length=max_seq_length, truncation=True)
        # A new column name: reusing "label" would keep the raw column's type (e.g. strings).
        if "label" in batch:
            if labels.is_regression:
                result["labels"] = [float(v) if v is not None else float("nan") for v in batch["label"]]
            else:
                result["labels"] = [-1 if v is None or v == -1 else labels.encoder.encode(v) for v in batch["label"]]
        return result

    processed = {}
    with training_args.main_process_first(desc="tokenizing"):
        for split in data.used:
            processed[split] = data.raw[split].map(
                preprocess,
                batched=True,
                remove_columns=data.raw[split].column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"tokenizing {split}",
            )
    return processed


def metric_function(task: str | None, labels: SimpleNamespace):
    """The Trainer's `compute_metrics`: the task's GLUE metric on argmax (or squeezed regression) predictions."""

    def compute_metrics(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        preds = np.squeeze(preds, axis=-1) if labels.is_regression else np.argmax(preds, axis=1)
        return glue_metrics(task, preds, p.label_ids, is_regression=labels.is_regression)

    return compute_metrics


def evaluate_splits(trainer, processed: dict, eval_splits: list[str], max_eval_samples: int | None) -> dict:
    """Evaluate each split (MNLI's mismatched set with `_mm` keys) and write eval_results.json."""
    combined = {}
    for split in eval_splits:
        eval_dataset = take(processed[split], max_eval_samples)
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        if split == "validation_mismatched":
            metrics = {f"{k}_mm": v for k, v in metrics.items()}
        combined.update(metrics)
    save_metrics(trainer.args.output_dir, "eval", combined, trainer.is_world_process_zero())
    return combined


def predict(trainer, test, data_args: GlueDataArguments, labels: SimpleNamespace) -> None:
    """Predict the test split and write predict_results_<task>.txt (index, label name or score)."""
    predict_dataset = take(test, data_args.max_predict_samples)
    if "labels" in predict_dataset.column_names:
        predict_dataset = predict_dataset.remove_columns("labels")
    predictions = trainer.predict(predict_dataset, metric_key_prefix="predict").predictions
    predictions = predictions[0] if isinstance(predictions, tuple) else predictions
    predictions = np.squeeze(predictions, axis=-1) if labels.is_regression else np.argmax(predictions, axis=1)
    if trainer.is_world_process_zero():
        lines = ["index\tprediction"] + [
            f"{i}\t{p:3.3f}" if labels.is_regression else f"{i}\t{labels.names[p]}" for i, p in enumerate(predictions)
        ]
        out = f"{trainer.args.output_dir}/predict_results_{data_args.task_name or 'custom'}.txt"
        atomic_write_text(out, "\n".join(lines) + "\n")
        logger.info("wrote %d predictions to %s", len(predictions), out)


if __name__ == "__main__":
    run_cli(main)
