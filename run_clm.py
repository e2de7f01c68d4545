#!/usr/bin/env python
"""Causal language modelling: train a decoder-only LM (from a checkpoint or from scratch) and report perplexity.

The text is tokenized document by document (each document closed with the tokenizer's EOS, so
documents stay apart), concatenated and cut into fixed blocks of --block_size tokens; the
remainder of each group of --group_size documents is dropped, as in HuggingFace's run_clm. Every
evaluation block therefore has the same number of predicted tokens, and the reported perplexity,
exp(eval_loss), is the exponential of the mean next-token cross-entropy over the evaluation
blocks: two models evaluated on the same data with the same tokenizer and --block_size see the
very same blocks, so their perplexities are comparable and repeatable.

    # a small Llama-layout teacher from scratch, on local text
    python run_clm.py --model_type llama --tokenizer_name ./tok \
        --config_overrides "num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024" \
        --train_file train.txt --validation_file valid.txt --do_train --do_eval --output_dir ./teacher
    # perplexity of a distilled student
    python run_clm.py --model_name_or_path ./student --tokenizer_name ./tok \
        --validation_file valid.txt --do_eval --block_size 128 --output_dir ./student_eval
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field

from finetune_common import (
    FinetuneTrainingArguments,
    ModelArguments,
    check_vocab,
    load_config,
    load_model,
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
from run_mlm import load_text_datasets
from utils import CliError, run_cli, set_seed

logger = logging.getLogger("causal_distill.run_clm")


@dataclass
class ClmModelArguments(ModelArguments):
    """Model arguments plus what training from scratch needs."""

    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch (no --model_name_or_path): the model type, e.g. llama, qwen2, mistral or "
            "gpt2. vocab_size and the BOS/EOS/pad ids are taken from the tokenizer."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "When training from scratch, comma-separated config settings, e.g. "
            '"num_hidden_layers=4,hidden_size=256,num_attention_heads=4,num_key_value_heads=2,intermediate_size=1024".'
        },
    )


@dataclass
class ClmDataArguments:
    """Which text to train and evaluate on, and how to cut it into blocks."""

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
    train_file: str | None = field(default=None, metadata={"help": "Training text: .txt (one document per line), .csv or .json."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation text: .txt (one document per line), .csv or .json."}
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": "The column holding the text (default: 'text', else the first column)."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Without a validation split, the percentage of the training data held out for evaluation."},
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per block (default: min(1024, what the model and tokenizer handle))."},
    )
    group_size: int = field(
        default=1000,
        metadata={"help": "Documents concatenated before cutting into blocks; each group's last partial block is dropped."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation blocks."})
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenized datasets."})

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise CliError(f"--validation_split_percentage must lie in [0, 100), got {self.validation_split_percentage}")
        if self.group_size < 1:
            raise CliError(f"--group_size must be at least 1, got {self.group_size}")


def build_config_and_model(model_args: ClmModelArguments, tokenizer):
    """The causal LM: from --model_name_or_path, or fresh from --model_type/--config_name (+ --config_overrides)."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    from_scratch = not model_args.model_name_or_path
    if model_args.config_overrides and not from_scratch:
        raise CliError("--config_overrides only applies when training from scratch (without --model_name_or_path)")
    if model_args.model_name_or_path or model_args.config_name:
        config = load_config(model_args)
    elif model_args.model_type:
        if model_args.model_type not in CONFIG_MAPPING:
            raise CliError(f"unknown --model_type {model_args.model_type!r}; e.g. llama, qwen2, mistral, gpt2")
        config = CONFIG_MAPPING[model_args.model_type]()
    else:
        raise CliError("pass --model_name_or_path, or --model_type (with --tokenizer_name) to train from scratch")
    if from_scratch:
        if model_args.config_overrides:
            try:
                config.update_from_string(model_args.config_overrides)
            except (ValueError, TypeError) as err:  # unknown key, malformed value, or a key whose default is None
                raise CliError(f"--config_overrides {model_args.config_overrides!r}: {err}") from None
        config.vocab_size = len(tokenizer)
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(tokenizer, key, None)
            if value is not None:
                setattr(config, key, value)
        logger.info("training a new %s model from scratch: %s", config.model_type, config.to_json_string())
        check_vocab(tokenizer, config, model_args)
        try:
            return config, AutoModelForCausalLM.from_config(config)
        except ValueError as err:
            raise CliError(f"--model_type {config.model_type}: not a causal LM ({err})") from None
    check_vocab(tokenizer, config, model_args)
    return config, load_model(AutoModelForCausalLM, model_args, config)


def tokenize_into_blocks(raw, data_args: ClmDataArguments, tokenizer, block_size: int, training_args):
    """Per split: documents tokenized (EOS-terminated), concatenated per group and cut into `block_size` blocks."""
    first = raw[next(iter(raw))]
    text_column = data_args.text_column_name or ("text" if "text" in first.column_names else first.column_names[0])
    for split, ds in raw.items():
        if text_column not in ds.column_names:
            raise CliError(f"the {split} data lacks the text column {text_column!r} (it has: {', '.join(ds.column_names)})")
    eos = tokenizer.eos_token_id

    def to_blocks(batch):
        texts = [t for t in batch[text_column] if isinstance(t, str) and t.strip()]
        docs = tokenizer(texts, return_attention_mask=False)["input_ids"] if texts else []
        ids = list(itertools.chain.from_iterable(d + [eos] if eos is not None and d[-1:] != [eos] else d for d in docs))
        blocks = [ids[i : i + block_size] for i in range(0, len(ids) - block_size + 1, block_size)]
        return {"input_ids": blocks}

    map_kwargs = {
        "batched": True,
        "batch_size": data_args.group_size,
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
    }
    with training_args.main_process_first(desc="tokenizing"):
        return type(raw)({
            split: ds.map(to_blocks, remove_columns=ds.column_names, desc=f"{split} into {block_size}-token blocks",
                          **map_kwargs)
            for split, ds in raw.items()
        })


def collate_blocks(features):
    """Stack equal-length blocks; no padding, no key/value cache (nothing is generated)."""
    import torch

    ids = torch.tensor([f["input_ids"] for f in features], dtype=torch.long)
    return {"input_ids": ids, "labels": ids.clone(), "use_cache": False}


# The command line: HfArgumentParser over these dataclasses.
ARGUMENTS = (ClmModelArguments, ClmDataArguments, FinetuneTrainingArguments)


def main(argv: list[str] | None = None) -> dict:
    """Run causal-LM training and/or evaluation as the command line `argv` asks; returns all metrics."""
    from transformers import Trainer

    model_args, data_args, training_args = parse_args(ARGUMENTS, argv, __doc__.splitlines()[0])
    setup_logging(training_args)
    require_action(training_args, ("do_train", "do_eval"))
    checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)

    raw, _ = load_text_datasets(data_args, training_args, model_args.cache_dir)
    tokenizer = load_tokenizer(model_args)
    config, model = build_config_and_model(model_args, tokenizer)
    if not model_args.model_name_or_path and not training_args.do_train:
        logger.warning("evaluating a freshly initialised model that was not trained")
    block_size = resolve_max_length(data_args.block_size, tokenizer, config, default=1024)

    splits = [s for s, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval)) if wanted]
    blocks = tokenize_into_blocks(type(raw)({s: raw[s] for s in splits}), data_args, tokenizer, block_size,
                                  training_args)
    train_dataset = eval_dataset = None
    for split, wanted, limit in (("train", training_args.do_train, data_args.max_train_samples),
                                 ("validation", training_args.do_eval, data_args.max_eval_samples)):
        if not wanted:
            continue
        dataset = take(blocks[split], limit)
        if len(dataset) == 0:
            raise CliError(f"the {split} data holds fewer than --block_size {block_size} tokens per "
                           f"--group_size {data_args.group_size} documents: no block to use; lower --block_size")
        logger.info("%s: %d blocks of %d tokens", split, len(dataset), block_size)
        if split == "train":
            train_dataset = dataset
        else:
            eval_dataset = dataset

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collate_blocks,
    )
    results = {}
    if training_args.do_train:
        results.update(train_and_save(trainer, checkpoint, len(train_dataset)))
    if training_args.do_eval:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        metrics["eval_block_size"] = block_size
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
