#!/usr/bin/env python
"""Fine-tune and evaluate a model on named-entity recognition (CoNLL-2003 from the hub, or local json files).

    python run_ner.py --model_name_or_path ./student --tokenizer_name bert-base-uncased \
        --train_file ner_train.json --validation_file ner_dev.json \
        --do_train --do_eval --output_dir ./ner_results

Local files hold one sentence per row with a `tokens` list and an `ner_tags` list (tag strings
such as B-PER, or integer ids together with --label_names). Each word's tag goes on its first
sub-token (every sub-token with --label_all_tokens). Scores are seqeval's entity-level precision,
recall and F1 and its token accuracy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from finetune_common import (FinetuneTrainingArguments, ModelArguments, check_columns, check_vocab, load_config,
                             load_model, load_split_files, load_tokenizer, make_trainer, pad_multiple,
                             resolve_max_length, save_metrics, start, take, train_and_save)
from finetune_common import finetune_main
from metrics import seqeval_metrics
from atomic_files import atomic_write_text
from utils import CliError, run_cli

logger = logging.getLogger("causal_distill.run_ner")

# Tokenizers of these families need add_prefix_space=True to take pre-split words.
PREFIX_SPACE_MODEL_TYPES = {"roberta", "gpt2", "longformer", "bloom", "deberta"}


@dataclass
class NerDataArguments:
    """Which data to fine-tune and evaluate on, and how words map to sub-tokens."""

    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset name, e.g. conll2003."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The hub dataset's configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local training data (.json/.jsonl: tokens, ner_tags)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation data (.json/.jsonl)."})
    test_file: str | None = field(default=None, metadata={"help": "Local data to tag with --do_predict (.json/.jsonl)."})
    text_column_name: str = field(default="tokens", metadata={"help": "The column holding each sentence's words."})
    label_column_name: str = field(default="ner_tags", metadata={"help": "The column holding each word's tag."})
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Sentences are truncated to this many tokens (default: min(512, model limit))."}
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every input to --max_seq_length instead of to the longest in the batch."}
    )
    label_all_tokens: bool = field(
        default=False,
        metadata={"help": "Label every sub-token of a word (B- becomes I- after the first), not only the first."},
    )
    return_entity_level_metrics: bool = field(
        default=False, metadata={"help": "Also report precision/recall/F1 for each entity type."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training sentences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation sentences."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Keep only the first N test sentences."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenized datasets."})


@dataclass
class NerTrainingArguments(FinetuneTrainingArguments):
    """Training arguments whose --label_names means the NER tag names (HF's run_ner.py flag).

    TrainingArguments' own `label_names` (the names of the label inputs) is not needed for token
    classification: main() moves the value out and resets it to None before the Trainer sees it.
    """

    label_names: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated tag names in id order (e.g. O,B-PER,I-PER): needed when the tags are "
            "integers without a ClassLabel feature; with string tags it fixes the label order."
        },
    )


def resolve_labels(
    raw, sources: dict, used: list[str], data_args: NerDataArguments, given: list[str] | None
) -> tuple[list[str], bool]:
    """The tag names in id order, and whether the data holds integer ids (True) or tag strings (False).

    The names come from --label_names, a ClassLabel feature, or the tags of the training split.
    Checks every tag of the `used` splits against the set: CliError naming the tag and its source.
    """
    from datasets import ClassLabel

    column = data_args.label_column_name
    reference = raw["train"] if "train" in raw else raw[used[0]]
    feature = reference.features[column]
    inner = getattr(feature, "feature", None)
    if isinstance(inner, ClassLabel):
        names, as_ids = (given or list(inner.names)), True
    else:
        sample = next((tag for tags in reference[column] for tag in tags if tag is not None), None)
        as_ids = isinstance(sample, (int, np.integer))
        if as_ids and not given:
            raise CliError(
                f"the {column} in {sources['train' if 'train' in raw else used[0]]} are integers: pass --label_names "
                "(comma-separated tag names in id order, e.g. O,B-PER,I-PER)"
            )
        if given:
            names = given
        else:  # the tags seen in training (a tag only in evaluation data could never be predicted)
            source_splits = ["train"] if "train" in used else used
            names = sorted({tag for split in source_splits for tags in raw[split][column] for tag in tags})
    for split in used:
        for tags in raw[split][column]:
            for tag in tags:
                valid = (0 <= int(tag) < len(names)) if as_ids and isinstance(tag, (int, np.integer)) else tag in names
                if not valid:
                    raise CliError(f"label {tag!r} in {sources[split]} is not in the label set: {', '.join(names)}")
    return names, as_ids


def trained_labels(config) -> list[str] | None:
    """The tag names of a model already fine-tuned for tagging (config id2label), None for a fresh head."""
    names = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    if not names or all(str(n).startswith("LABEL_") for n in names):
        return None
    return [str(n) for n in names]


# The command line: HfArgumentParser over these dataclasses.
ARGUMENTS = (ModelArguments, NerDataArguments, NerTrainingArguments)


@finetune_main
def main(argv: list[str] | None = None) -> dict:
    """Fine-tune, evaluate and/or predict as the command line `argv` asks; returns all metrics."""
    from transformers import DataCollatorForTokenClassification

    model_args, data_args, training_args, checkpoint = start(ARGUMENTS, argv, __doc__)
    given_names = [n.strip() for n in training_args.label_names.split(",") if n.strip()] if training_args.label_names else None
    training_args.label_names = None
    raw, sources, used = load_data(data_args, training_args, model_args.cache_dir)
    label_list, tags_are_ids = tag_set(raw, sources, used, data_args, given_names, load_config(model_args))
    tokenizer, model, config = load_tokenizer_and_model(model_args, label_list)
    max_seq_length = resolve_max_length(data_args.max_seq_length, tokenizer, config)
    processed = tokenize(raw, used, tokenizer, max_seq_length, label_list, tags_are_ids, data_args, training_args)
    train_dataset = take(processed["train"], data_args.max_train_samples) if training_args.do_train else None
    collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_multiple(training_args))
    trainer = make_trainer(model, training_args, tokenizer, collator, train_dataset=train_dataset,
                           compute_metrics=metric_function(label_list, data_args.return_entity_level_metrics))
    results = train_and_save(trainer, checkpoint, train_dataset)
    if training_args.do_eval:
        eval_dataset = take(processed["validation"], data_args.max_eval_samples)
        metrics = trainer.evaluate(eval_dataset=eval_dataset)
        metrics["eval_samples"] = len(eval_dataset)
        save_metrics(training_args.output_dir, "eval", metrics, trainer.is_world_process_zero())
        results.update(metrics)
    if training_args.do_predict:
        predict(trainer, processed["test"], raw["test"], tokenizer, max_seq_length, label_list, data_args)
    return results


def load_data(data_args: NerDataArguments, training_args, cache_dir: str | None) -> tuple[dict, dict, list[str]]:
    """(raw splits, their sources, the splits this run uses), each used split checked for its columns."""
    raw, sources, used = load_split_files(data_args, training_args, cache_dir)
    for split in used:
        required = [data_args.text_column_name] + ([] if split == "test" else [data_args.label_column_name])
        check_columns(raw[split], required, sources[split])
        check_rows(raw[split], data_args, sources[split])
    return raw, sources, used


def check_rows(dataset, data_args: NerDataArguments, source: str) -> None:
    """Every row's words are a list of strings and its tags (when present) a list of as many: CliError naming the
    file, the row and the column otherwise (a string of words would be tagged character by character)."""
    words_col, tags_col = data_args.text_column_name, data_args.label_column_name
    tags_all = dataset[tags_col] if tags_col in dataset.column_names else None
    for i, words in enumerate(dataset[words_col]):
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise CliError(f"{source} row {i}: {words_col} must be a list of words (strings), found "
                           f"{type(words).__name__} {str(words)[:60]!r}")
        if tags_all is not None:
            tags = tags_all[i]
            if not isinstance(tags, list) or len(tags) != len(words):
                n = len(tags) if isinstance(tags, list) else type(tags).__name__
                raise CliError(f"{source} row {i}: {tags_col} must be a list of one tag per word ({len(words)} "
                               f"words, {n} tags)")


def tag_set(raw, sources: dict, used: list[str], data_args: NerDataArguments, given_names: list[str] | None,
            base_config) -> tuple[list[str], bool]:
    """The tag names in id order and whether the data's tags are ids: from the tagged splits (`resolve_labels`),
    --label_names, or the model's own tags when it was fine-tuned for tagging already."""
    # The splits whose tags are read, checked and (test) scored.
    labelled = [s for s in used if data_args.label_column_name in raw[s].column_names]
    model_labels = trained_labels(base_config)
    if labelled:
        label_list, tags_are_ids = resolve_labels(raw, sources, labelled, data_args, given_names)
        if model_labels and set(model_labels) == set(label_list) and not tags_are_ids:
            label_list = model_labels  # keep the fine-tuned model's own id order
        return label_list, tags_are_ids
    if given_names:
        return given_names, False
    if model_labels:
        return model_labels, False
    raise CliError("--do_predict without tagged data needs the tag set: pass --label_names")


def load_tokenizer_and_model(model_args: ModelArguments, label_list: list[str]):
    """(fast tokenizer, token-classification model with a head for `label_list`, its config)."""
    from transformers import AutoModelForTokenClassification

    config = load_config(
        model_args,
        num_labels=len(label_list),
        id2label=dict(enumerate(label_list)),
        label2id={n: i for i, n in enumerate(label_list)},
    )
    extra = {"add_prefix_space": True} if config.model_type in PREFIX_SPACE_MODEL_TYPES else {}
    tokenizer = load_tokenizer(model_args, **extra)
    if not getattr(tokenizer, "is_fast", False):
        raise CliError(f"run_ner.py needs a fast tokenizer (word ids); {type(tokenizer).__name__} is not one")
    check_vocab(tokenizer, config, model_args)
    return tokenizer, load_model(AutoModelForTokenClassification, model_args, config), config


def tokenize(raw, used: list[str], tokenizer, max_seq_length: int, label_list: list[str], tags_are_ids: bool,
             data_args: NerDataArguments, training_args) -> dict:
    """Each used split tokenized from its words, each word's tag on its first sub-token (-100 elsewhere,
    or the I- tag on every sub-token with --label_all_tokens)."""
    label_to_id = {n: i for i, n in enumerate(label_list)}
    # For --label_all_tokens: the tag a word's later sub-tokens get (B-X -> I-X when I-X exists).
    b_to_i = [
        label_to_id.get("I-" + name[2:], i) if name.startswith("B-") else i for i, name in enumerate(label_list)
    ]
    padding = "max_length" if data_args.pad_to_max_length else False

    def tokenize_and_align(batch):
        encoded = tokenizer(
            batch[data_args.text_column_name],
            padding=padding,
            truncation=True,
            max_length=max_seq_length,
            is_split_into_words=True,
        )
        if data_args.label_column_name not in batch:
            return encoded
        all_labels = []
        for i, tags in enumerate(batch[data_args.label_column_name]):
            ids = [int(t) if tags_are_ids else label_to_id[t] for t in tags]
            previous = None
            labels = []
            for word in encoded.word_ids(batch_index=i):
                if word is None:
                    labels.append(-100)
                elif word != previous:
                    labels.append(ids[word])
                else:
                    labels.append(b_to_i[ids[word]] if data_args.label_all_tokens else -100)
                previous = word
            all_labels.append(labels)
        encoded["labels"] = all_labels
        return encoded

    processed = {}
    with training_args.main_process_first(desc="tokenizing"):
        for split in used:
            processed[split] = raw[split].map(
                tokenize_and_align,
                batched=True,
                remove_columns=raw[split].column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"tokenizing {split}",
            )
    return processed


def metric_function(label_list: list[str], entity_level: bool):
    """The Trainer's `compute_metrics`: seqeval scores of the argmax tags at the labelled positions."""

    def compute_metrics(p):
        preds = np.argmax(p.predictions, axis=2)
        pred_tags = [[label_list[q] for q, l in zip(row_p, row_l) if l != -100] for row_p, row_l in zip(preds, p.label_ids)]
        gold_tags = [[label_list[l] for l in row_l if l != -100] for row_l in p.label_ids]
        return seqeval_metrics(pred_tags, gold_tags, entity_level=entity_level)

    return compute_metrics


def predict(trainer, test, raw_test, tokenizer, max_seq_length: int, label_list: list[str],
            data_args: NerDataArguments) -> None:
    """Tag the test sentences: predictions.txt holds one line of tags per sentence, one tag per word."""
    predict_dataset = take(test, data_args.max_predict_samples)
    output = trainer.predict(predict_dataset, metric_key_prefix="predict")
    if not trainer.is_world_process_zero():
        return
    preds = np.argmax(output.predictions, axis=2)
    lines = []
    for i, row in enumerate(preds):
        words = raw_test[i][data_args.text_column_name]
        word_ids = tokenizer(words, truncation=True, max_length=max_seq_length, is_split_into_words=True).word_ids()
        first = {}
        for position, word in enumerate(word_ids):
            if word is not None and word not in first:
                first[word] = position
        # Words cut off by --max_seq_length get "O".
        lines.append(" ".join(label_list[row[first[w]]] if w in first else "O" for w in range(len(words))))
    out = f"{trainer.args.output_dir}/predictions.txt"
    atomic_write_text(out, "\n".join(lines) + "\n")
    logger.info("wrote tags for %d sentences to %s", len(lines), out)
    if output.metrics and output.label_ids is not None:
        save_metrics(trainer.args.output_dir, "predict", output.metrics)


if __name__ == "__main__":
    run_cli(main)
