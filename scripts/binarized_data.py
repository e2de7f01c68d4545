"""Binarize a text corpus once, before distillation: tokenize every example and store its ids.

Each non-empty example becomes `[CLS] text [SEP]` (bert), `<s> text </s>` (roberta),
`<|endoftext|> text <|endoftext|>` (gpt2) or `BOS text EOS` with the tokenizer's own BOS and EOS
(the Llama-layout types llama, mistral, qwen2, qwen3, gemma, olmo2, smollm3; a tokenizer without a
BOS, like Qwen's, opens with its EOS as GPT-2 does), tokenized in batches by the tokenizer's fast (Rust)
implementation. The sequences are shuffled with --seed and written to
`{dump_file}.{split}.{tokenizer}.bin` (memory-mappable, the default) or `.pickle` (the original
Causal-Distill format, with --format pickle), where {tokenizer} is the last path component of
--tokenizer_name: `--dump_file data/binarized_text --tokenizer_name bert-base-uncased` writes
data/binarized_text.train.bert-base-uncased.bin. Pass that name to token_counts.py --data_file
and causal_train.py --data_file.

Input is either local (--file_path: a `save_to_disk` folder, a text file with one example per
line, .json/.jsonl, .csv, .parquet, or a folder of such files) or from the Hugging Face hub
(--dataset_name, `+` concatenates; `wikitext` means WikiText-103 raw).

Example:
  python scripts/binarized_data.py --file_path corpus.txt --tokenizer_name ./my_tokenizer \\
      --dump_file data/binarized_text
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from binarize import SPECIAL_TOKENS, available_cpus, count_rows, load_sources, load_tokenizer_and_wrap_ids, write_corpus
from binarized_io import FORMATS, dtype_for_vocab, output_path
from utils import CliError, check_output_parent, check_writable, logger, require_file, run_cli

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--file_path",
        help="Local input: a folder written by datasets' save_to_disk (Dataset or DatasetDict; --split picks), "
        "a text file (one example per line), .json/.jsonl, .csv, .parquet, or a folder of such files.",
    )
    source.add_argument(
        "--dataset_name",
        help="Hub dataset(s), '+' to concatenate (e.g. wikitext+bookcorpus); 'name:config' picks a config; "
        "'wikitext' means wikitext/wikitext-103-raw-v1. Needs network access or a warm --cache_dir.",
    )
    parser.add_argument("--cache_dir", default=None, help="Cache folder for datasets and tokenizers (default: HF's).")
    parser.add_argument(
        "--split",
        default="train",
        help="Split to binarize (hub datasets, DatasetDict folders); also names the output (default: train).",
    )
    parser.add_argument("--field_name", default="text", help="Column holding the text (default: text).")
    parser.add_argument(
        "--max_parsing_example", type=int, default=-1, help="Read only the first N rows, empty ones included (-1: all)."
    )
    parser.add_argument(
        "--tokenizer_type",
        default="bert",
        choices=sorted(SPECIAL_TOKENS),
        help="Which special tokens wrap each example: bert [CLS]/[SEP], roberta <s>/</s>, gpt2 <|endoftext|>; "
        "llama, mistral, qwen2, qwen3, gemma, olmo2, smollm3: the tokenizer's BOS/EOS (its EOS when it has no BOS).",
    )
    parser.add_argument(
        "--tokenizer_name",
        default="bert-base-uncased",
        help="Tokenizer: a hub name or a local save_pretrained folder (default: bert-base-uncased, from the hub).",
    )
    parser.add_argument(
        "--dump_file",
        default="data/binarized_text",
        help="Output prefix; writes {dump_file}.{split}.{tokenizer}.{bin|pickle} ({tokenizer}: the last path "
        "component of --tokenizer_name; .bin unless --format pickle), creating folders (default: data/binarized_text).",
    )
    parser.add_argument(
        "--fast_process", action="store_true", help="Tokenize in --preprocessing_num_workers processes (same ids)."
    )
    parser.add_argument(
        "--preprocessing_num_workers",
        type=int,
        default=None,
        help="Processes for --fast_process (default, and at most: the number of CPUs this process may use).",
    )
    parser.add_argument(
        "--seed", type=int, default=56, help="Seed of the shuffle of the output sequences (default: 56)."
    )
    parser.add_argument(
        "--format",
        default="mmap",
        choices=FORMATS,
        help="mmap: one memory-mappable .bin file (default); pickle: the original list-of-arrays pickle.",
    )
    parser.add_argument("--batch_size", type=int, default=1000, help="Examples per tokenizer call (default: 1000).")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the binarization; returns the path written."""
    args = build_parser().parse_args(argv)
    if args.preprocessing_num_workers is None:
        args.preprocessing_num_workers = available_cpus()
    if args.batch_size < 1 or args.preprocessing_num_workers < 1:
        raise CliError("--batch_size and --preprocessing_num_workers must be at least 1")
    if args.max_parsing_example == 0 or args.max_parsing_example < -1:
        raise CliError(f"--max_parsing_example must be -1 (every row) or a positive number, not {args.max_parsing_example}")
    check_output_parent(str(args.dump_file) + ".x", "--dump_file", is_file=False)
    check_writable(str(args.dump_file) + ".x", "--dump_file")
    if args.file_path is not None:
        require_file(args.file_path, "--file_path")
    source_name = args.file_path or args.dataset_name

    logger.info("loading tokenizer %s", args.tokenizer_name)
    tokenizer, bos_id, eos_id = load_tokenizer_and_wrap_ids(args.tokenizer_name, args.tokenizer_type, args.cache_dir)
    vocab_size = len(tokenizer)
    dtype = dtype_for_vocab(vocab_size)
    sources = load_sources(args)
    n_rows = count_rows(sources, args.max_parsing_example)
    out = output_path(args.dump_file, args.split, args.tokenizer_name, args.format)
    workers = min(args.preprocessing_num_workers, available_cpus()) if args.fast_process else 1
    if args.fast_process and workers < args.preprocessing_num_workers:
        logger.warning("--preprocessing_num_workers %d: only %d CPU(s) available, using %d processes",
                       args.preprocessing_num_workers, workers, workers)
    logger.info("binarizing %d rows of %s with %d process(es) into %s", n_rows, source_name, workers, out)
    writer, n_skipped, elapsed = write_corpus(
        out, args.format, sources, args.field_name, args.batch_size, args.max_parsing_example, tokenizer,
        args.tokenizer_name, bos_id, eos_id, dtype, workers, args.seed, source_name)
    logger.info(
        "wrote %s: %d examples (%d empty skipped), %d tokens in %.1fs (%.0f tokens/s)",
        out, writer.n_sequences, n_skipped, writer.n_tokens, elapsed, writer.n_tokens / max(elapsed, 1e-9),
    )
    return out


if __name__ == "__main__":
    run_cli(main)
