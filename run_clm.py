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
from dataclasses import dataclass, field

from finetune_common import (FinetuneTrainingArguments, LmDataArguments, LmModelArguments, evaluate_perplexity,
                             load_lm_and_text, make_trainer, start, take, text_column, train_and_save)
from finetune_common import finetune_main
from utils import CliError, run_cli

logger = logging.getLogger("causal_distill.run_clm")


@dataclass
class ClmDataArguments(LmDataArguments):
    """The text data, and how it is cut into blocks."""

    block_size: int | None = field(
        default=None,
        metadata={"help": "Tokens per block (default: min(1024, what the model and tokenizer handle))."},
    )
    group_size: int = field(
        default=1000,
        metadata={"help": "Documents concatenated before cutting into blocks; each group's last partial block is dropped."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.group_size < 1:
            raise CliError(f"--group_size must be at least 1, got {self.group_size}")


def tokenize_into_blocks(raw, data_args: ClmDataArguments, tokenizer, block_size: int, training_args):
    """Per split: documents tokenized (EOS-terminated), concatenated per group and cut into `block_size` blocks."""
    column = text_column(raw, data_args)
    eos = tokenizer.eos_token_id

    def to_blocks(batch):
        texts = [t for t in batch[column] if isinstance(t, str) and t.strip()]
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
ARGUMENTS = (LmModelArguments, ClmDataArguments, FinetuneTrainingArguments)


@finetune_main
def main(argv: list[str] | None = None) -> dict:
    """Run causal-LM training and/or evaluation as the command line `argv` asks; returns all metrics."""
    model_args, data_args, training_args, checkpoint = start(ARGUMENTS, argv, __doc__, ("do_train", "do_eval"))
    raw, tokenizer, config, model, block_size = load_lm_and_text(model_args, data_args, training_args, "causal",
                                                                 data_args.block_size, default_length=1024,
                                                                 length_flag="--block_size")
    train_dataset, eval_dataset = prepare_datasets(raw, data_args, tokenizer, block_size, training_args)
    trainer = make_trainer(model, training_args, tokenizer, collate_blocks, train_dataset=train_dataset,
                           eval_dataset=eval_dataset)
    results = train_and_save(trainer, checkpoint, train_dataset)
    if training_args.do_eval:
        results.update(evaluate_perplexity(trainer, eval_dataset, eval_block_size=block_size))
    return results


def prepare_datasets(raw, data_args: ClmDataArguments, tokenizer, block_size: int, training_args):
    """(training blocks or None, evaluation blocks or None); CliError when a split yields no block."""
    splits = [s for s, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval)) if wanted]
    blocks = tokenize_into_blocks(type(raw)({s: raw[s] for s in splits}), data_args, tokenizer, block_size,
                                  training_args)
    datasets = {"train": None, "validation": None}
    for split, limit in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if split not in splits:
            continue
        dataset = take(blocks[split], limit)
        if len(dataset) == 0:
            source = getattr(raw, "sources", {}).get(split, f"the {split} data")
            raise CliError(f"{source} holds fewer than --block_size {block_size} tokens per --group_size "
                           f"{data_args.group_size} documents: no block to use; lower --block_size")
        logger.info("%s: %d blocks of %d tokens", split, len(dataset), block_size)
        datasets[split] = dataset
    return datasets["train"], datasets["validation"]


if __name__ == "__main__":
    run_cli(main)
