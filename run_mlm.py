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
from dataclasses import dataclass, field

import numpy as np

from finetune_common import (FinetuneTrainingArguments, LmDataArguments, LmModelArguments, evaluate_perplexity,
                             load_lm_and_text, make_trainer, pad_multiple, start, take, text_column, train_and_save)
from finetune_common import finetune_main
from utils import CliError, run_cli

logger = logging.getLogger("causal_distill.run_mlm")


@dataclass
class MlmDataArguments(LmDataArguments):
    """The text data, and how it is cut into sequences and masked."""

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

    def __post_init__(self):
        if not 0.0 < self.mlm_probability < 1.0:
            raise CliError(f"--mlm_probability must lie in (0, 1), got {self.mlm_probability}")
        super().__post_init__()


def tokenize_texts(raw, data_args: MlmDataArguments, tokenizer, max_seq_length: int, training_args):
    """Tokenized datasets: one sequence per line (--line_by_line) or concatenated text cut into blocks."""
    column = text_column(raw, data_args)
    padding = "max_length" if data_args.pad_to_max_length else False
    map_kwargs = {
        "batched": True,
        "num_proc": data_args.preprocessing_num_workers,
        "load_from_cache_file": not data_args.overwrite_cache,
    }

    def tokenize_lines(batch):
        texts = [t for t in batch[column] if isinstance(t, str) and t.strip()]
        return tokenizer(
            texts, padding=padding, truncation=True, max_length=max_seq_length, return_special_tokens_mask=True
        )

    def tokenize_all(batch):
        texts = [t for t in batch[column] if isinstance(t, str)]
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


def check_maskable(dataset, mlm_probability: float, source: str | None) -> None:
    """CliError when the training data has so few tokens to mask that a run would mask none on average: a
    one-word file trained with loss 0.0 at every step and saved the model as if it had learnt something."""
    maskable = 0
    for special in dataset["special_tokens_mask"]:
        maskable += len(special) - sum(special)
        if maskable * mlm_probability >= 1:
            return
    raise CliError(f"{source or 'the training data'} has {maskable} token(s) that can be masked; at --mlm_probability "
                   f"{mlm_probability:g} that is {maskable * mlm_probability:.2g} masked per pass over the data, so the "
                   f"batches would have nothing to predict: give more text")


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
ARGUMENTS = (LmModelArguments, MlmDataArguments, FinetuneTrainingArguments)


@finetune_main
def main(argv: list[str] | None = None) -> dict:
    """Run masked-LM training and/or evaluation as the command line `argv` asks; returns all metrics."""
    model_args, data_args, training_args, checkpoint = start(ARGUMENTS, argv, __doc__, ("do_train", "do_eval"))
    raw, tokenizer, config, model, max_seq_length = load_lm_and_text(model_args, data_args, training_args, "masked",
                                                                     data_args.max_seq_length, default_length=512)
    train_dataset, eval_dataset = prepare_datasets(raw, data_args, tokenizer, max_seq_length, training_args)
    pad = pad_multiple(training_args) if not data_args.pad_to_max_length else None
    trainer = make_trainer(model, training_args, tokenizer, MlmCollator(tokenizer, data_args.mlm_probability, pad),
                           train_dataset=train_dataset, eval_dataset=eval_dataset)
    results = train_and_save(trainer, checkpoint, train_dataset)
    if training_args.do_eval:
        results.update(evaluate_perplexity(trainer, eval_dataset))
    return results


def prepare_datasets(raw, data_args: MlmDataArguments, tokenizer, max_seq_length: int, training_args):
    """(training sequences or None, evaluation sequences masked once (`mask_fixed`) or None)."""
    splits = [s for s, wanted in (("train", training_args.do_train), ("validation", training_args.do_eval)) if wanted]
    tokenized = tokenize_texts(type(raw)({s: raw[s] for s in splits}), data_args, tokenizer, max_seq_length, training_args)
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_dataset = take(tokenized["train"], data_args.max_train_samples)
        if len(train_dataset) == 0:
            raise CliError(f"{getattr(raw, 'sources', {}).get('train', 'the training data')} holds no text")
        check_maskable(train_dataset, data_args.mlm_probability, getattr(raw, "sources", {}).get("train"))
    if training_args.do_eval:
        eval_dataset = take(tokenized["validation"], data_args.max_eval_samples)
        if len(eval_dataset) == 0:
            raise CliError(f"{getattr(raw, 'sources', {}).get('validation', 'the evaluation data')} holds no text")
        with training_args.main_process_first(desc="fixed evaluation masking"):
            eval_dataset = mask_fixed(eval_dataset, tokenizer, data_args.mlm_probability, data_args.eval_mask_seed)
    return train_dataset, eval_dataset


if __name__ == "__main__":
    run_cli(main)
