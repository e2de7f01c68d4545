#!/usr/bin/env python
"""Masked language modelling: train a BERT-style model (from a checkpoint or from scratch) and report perplexity.

Evaluation masks the evaluation set once, with a generator seeded by --eval_mask_seed and each
example's index, before the Trainer sees it: two models evaluated on the same data with the same
--max_seq_length, --line_by_line and --eval_mask_seed see the very same masked positions, so their
perplexities (exp of the eval loss) are comparable and repeatable. Training masks afresh each batch.

    python run_mlm.py --model_name_or_path ./student --tokenizer_name bert-base-uncased \
        --validation_file wiki.valid.txt --do_eval --output_dir ./mlm_eval
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

import numpy as np

from finetune_common import (
    FinetuneTrainingArguments,
    ModelArguments,
    check_vocab,
    load_config,
    load_model,
    load_raw_datasets,
    load_tokenizer,
    parse_args,
    require_action,
    resolve_checkpoint,
    resolve_max_length,
    save_metrics,
    setup_logging,
    take,
    train_and_save,
)
from utils import CliError, require_file, run_cli, set_seed

logger = logging.getLogger("causal_distill.run_mlm")


@dataclass
class MlmModelArguments(ModelArguments):
    """Model arguments plus what training from scratch needs."""

    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch (no --model_name_or_path): the model type, e.g. bert or distilbert. "
            "vocab_size is taken from the tokenizer."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "When training from scratch, comma-separated config settings, e.g. "
            '"num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024".'
        },
    )


@dataclass
class MlmDataArguments:
    """Which text to train and evaluate on, and how to cut it into sequences."""

    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset name, e.g. wikitext."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The hub dataset's configuration, e.g. wikitext-103-raw-v1."}
    )
    dataset_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder written by datasets' save_to_disk: a DatasetDict (train/validation/test splits; "
            "test stands in for a missing validation) or a single Dataset (used as the training data with "
            "--do_train, as the evaluation data otherwise)."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "Training text: .txt (one text per line), .csv or .json."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation text: .txt (one text per line), .csv or .json."}
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": "The column holding the text (default: 'text', else the first column)."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Without a validation split, the percentage of the training data held out for evaluation."},
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": "Sequence length after tokenization: the block size when grouping, the truncation length "
            "with --line_by_line (default: min(512, what the model handles))."
        },
    )
    line_by_line: bool = field(
        default=False,
        metadata={
            "help": "Treat each non-empty line (row) as one sequence, truncated to --max_seq_length. Without it, "
            "texts are concatenated and cut into --max_seq_length blocks."
        },
    )
    pad_to_max_length: bool = field(
        default=False, metadata={"help": "Pad every sequence to --max_seq_length instead of to the longest in the batch."}
    )
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens masked (80%% [MASK], 10%% random, 10%% kept)."})
    eval_mask_seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the fixed evaluation masking (independent of --seed), so that perplexities of "
            "different models on the same data are comparable."
        },
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training sequences."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation sequences."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenized datasets."})

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise CliError(f"--mlm_probability must lie in (0, 1), got {self.mlm_probability}")
        if not 0 <= self.validation_split_percentage < 100:
            raise CliError(f"--validation_split_percentage must lie in [0, 100), got {self.validation_split_percentage}")


def load_text_datasets(data_args: MlmDataArguments, training_args, cache_dir: str | None):
    """The raw train/validation splits, from --dataset_dir, local files or the hub; splits off validation if needed."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if data_args.dataset_dir:
        path = require_file(data_args.dataset_dir, "--dataset_dir")
        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise CliError(f"--dataset_dir {path}: not a folder written by save_to_disk: {err}") from None
        if isinstance(loaded, Dataset):
            loaded = DatasetDict({"train" if training_args.do_train else "validation": loaded})
        raw = DatasetDict(loaded)
        if "validation" not in raw and "test" in raw:
            raw["validation"] = raw["test"]
        sources = {split: f"{path} (split {split})" for split in raw}
    else:
        raw, sources = load_raw_datasets(
            data_files={"train": data_args.train_file, "validation": data_args.validation_file},
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            cache_dir=cache_dir,
        )
    if "validation" not in raw and training_args.do_eval:
        if "train" not in raw:
            raise CliError("--do_eval needs evaluation data: pass --validation_file")
        train = raw["train"]
        n_val = len(train) * data_args.validation_split_percentage // 100
        if n_val == 0:
            raise CliError(
                f"no validation data: pass --validation_file, or a --validation_split_percentage that keeps at "
                f"least one of the {len(train)} training rows"
            )
        logger.info("holding out the first %d of %d training rows for evaluation", n_val, len(train))
        raw["validation"] = train.select(range(n_val))
        raw["train"] = train.select(range(n_val, len(train)))
        sources["validation"] = f"the first {data_args.validation_split_percentage}% of {sources['train']}"
    if training_args.do_train and "train" not in raw:
        raise CliError("--do_train needs training data: pass --train_file, --dataset_name or --dataset_dir")
    return raw, sources


def build_config_and_model(model_args: MlmModelArguments, tokenizer):
    """The MLM model: from --model_name_or_path, or fresh from --model_type/--config_name (+ --config_overrides)."""
    from transformers import CONFIG_MAPPING, AutoModelForMaskedLM

    from_scratch = not model_args.model_name_or_path
    if model_args.config_overrides and not from_scratch:
        raise CliError("--config_overrides only applies when training from scratch (without --model_name_or_path)")
    if model_args.model_name_or_path or model_args.config_name:
        config = load_config(model_args)
    elif model_args.model_type:
        if model_args.model_type not in CONFIG_MAPPING:
            raise CliError(f"unknown --model_type {model_args.model_type!r}; e.g. bert, distilbert, roberta")
        config = CONFIG_MAPPING[model_args.model_type]()
    else:
        raise CliError("pass --model_name_or_path, or --model_type (with --tokenizer_name) to train from scratch")
    if from_scratch:
        if model_args.config_overrides:
            try:
                config.update_from_string(model_args.config_overrides)
            except ValueError as err:
                raise CliError(f"--config_overrides {model_args.config_overrides!r}: {err}") from None
        config.vocab_size = len(tokenizer)
        config.pad_token_id = tokenizer.pad_token_id
        logger.info("training a new %s model from scratch: %s", config.model_type, config.to_json_string())
        check_vocab(tokenizer, config, model_args)
        return config, AutoModelForMaskedLM.from_config(config)
    check_vocab(tokenizer, config, model_args)
    return config, load_model(AutoModelForMaskedLM, model_args, config)


def tokenize_texts(raw, data_args: MlmDataArguments, tokenizer, max_seq_length: int, training_args):
    """Tokenized datasets: one sequence per line (--line_by_line) or concatenated text cut into blocks."""
    first = raw[next(iter(raw))]
    text_column = data_args.text_column_name or ("text" if "text" in first.column_names else first.column_names[0])
    for split, ds in raw.items():
        if text_column not in ds.column_names:
            raise CliError(f"the {split} data lacks the text column {text_column!r} (it has: {', '.join(ds.column_names)})")
    padding = "max_length" if data_args.pad_to_max_length else False
    map_kwargs = {
        "batched": True,
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
    }

    def tokenize_lines(batch):
        texts = [t for t in batch[text_column] if isinstance(t, str) and t.strip()]
        return tokenizer(
            texts, padding=padding, truncation=True, max_length=max_seq_length, return_special_tokens_mask=True
        )

    def tokenize_all(batch):
        texts = [t for t in batch[text_column] if isinstance(t, str)]
        return tokenizer(texts, return_special_tokens_mask=True)

    def group_texts(batch):
        # The last block of each map batch may be shorter: it is kept rather than dropped, so a small
        # evaluation file still yields at least one block.
        concatenated = {k: list(itertools.chain.from_iterable(batch[k])) for k in batch}
        total = len(concatenated["input_ids"])
        return {
            k: [values[i : i + max_seq_length] for i in range(0, total, max_seq_length)]
            for k, values in concatenated.items()
        }

    with training_args.main_process_first(desc="tokenizing"):
        columns = {split: ds.column_names for split, ds in raw.items()}
        if data_args.line_by_line:
            return type(raw)(
                {split: ds.map(tokenize_lines, remove_columns=columns[split], desc=f"tokenizing {split}", **map_kwargs) for split, ds in raw.items()}
            )
        tokenized = {
            split: ds.map(tokenize_all, remove_columns=columns[split], desc=f"tokenizing {split}", **map_kwargs)
            for split, ds in raw.items()
        }
        return type(raw)(
            {split: ds.map(group_texts, desc=f"grouping {split} into {max_seq_length}-token blocks", **map_kwargs) for split, ds in tokenized.items()}
        )


def mask_fixed(dataset, tokenizer, mlm_probability: float, seed: int):
    """Mask `dataset` once, deterministically: adds `labels` (-100 where not masked) and rewrites `input_ids`.

    Each example draws from `np.random.default_rng([seed, index])`, so the masking does not depend
    on batching, ordering or the process. BERT's recipe: `mlm_probability` of the non-special tokens
    are chosen; 80% become [MASK], 10% a random token, 10% stay. An example where the draw picks
    nothing gets one chosen position, so no evaluation batch is left without a target.
    """
    if tokenizer.mask_token_id is None:
        raise CliError("the tokenizer has no mask token: masked language modelling needs one")
    mask_id, pad_id, vocab = tokenizer.mask_token_id, tokenizer.pad_token_id, len(tokenizer)

    def apply(batch, indices):
        new_ids, labels = [], []
        for ids, special, index in zip(batch["input_ids"], batch["special_tokens_mask"], indices):
            rng = np.random.default_rng([seed, index])
            ids = np.asarray(ids, dtype=np.int64)
            maskable = ~np.asarray(special, dtype=bool) & (ids != pad_id)
            chosen = (rng.random(len(ids)) < mlm_probability) & maskable
            if not chosen.any() and maskable.any():
                chosen[rng.choice(np.flatnonzero(maskable))] = True
            action = rng.random(len(ids))
            random_ids = rng.integers(0, vocab, len(ids))
            label = np.where(chosen, ids, -100)
            ids = np.where(chosen & (action < 0.8), mask_id, ids)
            ids = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, ids)
            new_ids.append(ids.tolist())
            labels.append(label.tolist())
        return {"input_ids": new_ids, "labels": labels}

    masked = dataset.map(apply, with_indices=True, batched=True, desc="fixed evaluation masking")
    return masked.remove_columns("special_tokens_mask")


class MlmCollator:
    """Random masking for training batches; padding only for examples already masked (they carry `labels`)."""

    def __init__(self, tokenizer, mlm_probability: float, pad_to_multiple_of: int | None = None):
        from transformers import DataCollatorForLanguageModeling, DataCollatorForTokenClassification

        self.random_masking = DataCollatorForLanguageModeling(
            tokenizer, mlm_probability=mlm_probability, pad_to_multiple_of=pad_to_multiple_of
        )
        self.padding_only = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, features):
        if "labels" in features[0]:
            return self.padding_only(features)
        return self.random_masking(features)


# The command line: HfArgumentParser over these dataclasses.
ARGUMENTS = (MlmModelArguments, MlmDataArguments, FinetuneTrainingArguments)


def main(argv: list[str] | None = None) -> dict:
    """Run masked-LM training and/or evaluation as the command line `argv` asks; returns all metrics."""
    from transformers import Trainer

    model_args, data_args, training_args = parse_args(ARGUMENTS, argv, __doc__.splitlines()[0])
    setup_logging(training_args)
    require_action(training_args, ("do_train", "do_eval"))
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(training_args, flag) < 1:
            raise CliError(f"--{flag} must be >= 1, not {getattr(training_args, flag)}")
    checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)

    raw, _ = load_text_datasets(data_args, training_args, model_args.cache_dir)
    tokenizer = load_tokenizer(model_args)
    config, model = build_config_and_model(model_args, tokenizer)
    if not model_args.model_name_or_path and not training_args.do_train:
        logger.warning("evaluating a freshly initialised model that was not trained")
    max_seq_length = resolve_max_length(data_args.max_seq_length, tokenizer, config)

    splits = [s for s, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval)) if wanted]
    tokenized = tokenize_texts(type(raw)({s: raw[s] for s in splits}), data_args, tokenizer, max_seq_length, training_args)

    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = take(tokenized["train"], data_args.max_train_samples)
        if len(train_dataset) == 0:
            raise CliError("the training data holds no text")
    if training_args.do_eval:
        eval_dataset = take(tokenized["validation"], data_args.max_eval_samples)
        if len(eval_dataset) == 0:
            raise CliError("the evaluation data holds no text")
        with training_args.main_process_first(desc="fixed evaluation masking"):
            eval_dataset = mask_fixed(eval_dataset, tokenizer, data_args.mlm_probability, data_args.eval_mask_seed)

    pad_multiple = 8 if (training_args.fp16 or training_args.bf16) and not data_args.pad_to_max_length else None
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=MlmCollator(tokenizer, data_args.mlm_probability, pad_multiple),
    )

    results = {}
    if training_args.do_train:
        results.update(train_and_save(trainer, checkpoint, len(train_dataset)))
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        try:
            perplexity = math.exp(metrics["eval_loss"])
        except OverflowError:
            perplexity = float("inf")
        metrics["perplexity"] = perplexity
        save_metrics(training_args.output_dir, "eval", metrics, trainer.is_world_process_zero())
        results.update(metrics)
    return results


if __name__ == "__main__":
    run_cli(main)
