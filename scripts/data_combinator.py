"""Merge two binarized corpora (e.g. WikiText and BookCorpus) into one shuffled corpus.

Either input may be a memory-mapped .bin or an original pickle; the output is
`{dump_file}.{split}.{tokenizer}.{bin|pickle}`. Files made with different vocabularies are
refused: different recorded vocabulary sizes, tokenizer names or vocabulary fingerprints, an id
of one file beyond the other's vocabulary, or (for two pickles) different token dtypes.

Example:
  python scripts/data_combinator.py --file_path_left data/wiki.train.bert-base-uncased.bin \\
      --file_path_right data/books.train.bert-base-uncased.bin --dump_file data/wiki_books
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from binarized_io import FORMATS, Corpus, CorpusWriter, load_corpus, output_path
from utils import CliError, check_output_parent, check_writable, logger, run_cli

# Sequences copied per write; bounds the RAM a merge of memory-mapped corpora needs.
COPY_BATCH = 4096


def check_compatible(left: Corpus, right: Corpus) -> None:
    """Raise CliError naming both files when they cannot come from the same vocabulary."""

    def refuse(why: str) -> None:
        raise CliError(f"{left.path} and {right.path} were made with different vocabularies: {why}")

    if left.vocab_size is not None and right.vocab_size is not None and left.vocab_size != right.vocab_size:
        refuse(f"vocabulary sizes {left.vocab_size} and {right.vocab_size}")
    same_vocab = left.vocab_hash is not None and left.vocab_hash == right.vocab_hash
    if left.vocab_hash is not None and right.vocab_hash is not None and not same_vocab:
        refuse(f"vocabulary fingerprints {left.vocab_hash} and {right.vocab_hash}")
    if left.tokenizer_name and right.tokenizer_name and left.tokenizer_name != right.tokenizer_name and not same_vocab:
        refuse(f"tokenizers {left.tokenizer_name} and {right.tokenizer_name}")
    for known, other in ((left, right), (right, left)):
        if known.vocab_size is not None and other.vocab_size is None:
            top = other.max_id()
            if top >= known.vocab_size:
                refuse(f"{other.path} holds id {top}, beyond the {known.vocab_size} entries of {known.path}")
    if left.vocab_size is None and right.vocab_size is None and left.dtype != right.dtype:
        refuse(f"token dtypes {left.dtype} and {right.dtype}")


def merge(left: Corpus, right: Corpus, writer: CorpusWriter) -> None:
    """Append every sequence of `left`, then of `right`, to `writer` (which shuffles on closing)."""
    for corpus in (left, right):
        for i in range(0, len(corpus), COPY_BATCH):
            seqs = [corpus[j] for j in range(i, min(i + COPY_BATCH, len(corpus)))]
            writer.add_batch(np.concatenate(seqs), [len(s) for s in seqs])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file_path_left", required=True, help="First binarized corpus (.bin or .pickle).")
    parser.add_argument("--file_path_right", required=True, help="Second binarized corpus (.bin or .pickle).")
    parser.add_argument("--split", default="train", help="Split name used in the output file name (default: train).")
    parser.add_argument(
        "--tokenizer_name",
        default=None,
        help="Tokenizer name used in the output file name (default: the one the inputs record).",
    )
    parser.add_argument(
        "--dump_file", default="data/binarized_text", help="Output prefix, folders are created (default: %(default)s)."
    )
    parser.add_argument("--seed", type=int, default=56, help="Seed of the merged shuffle (default: 56).")
    parser.add_argument(
        "--format", default="mmap", choices=FORMATS, help="mmap (.bin, the default) or pickle (original)."
    )
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    check_writable(check_output_parent(str(args.dump_file) + ".x", "--dump_file", is_file=False), "--dump_file")
    left, right = load_corpus(args.file_path_left), load_corpus(args.file_path_right)
    for corpus in (left, right):
        corpus.check_ids(corpus.vocab_size)
    logger.info("left: %s; right: %s", left.describe(), right.describe())
    check_compatible(left, right)
    tokenizer_name = args.tokenizer_name or left.tokenizer_name or right.tokenizer_name
    if not tokenizer_name:
        raise CliError("neither input records its tokenizer: pass --tokenizer_name to name the output")
    vocab_size = left.vocab_size if left.vocab_size is not None else right.vocab_size
    dtype = None
    if vocab_size is None:  # two pickles: keep their dtype (uint16 or int32, as the vocabulary needed)
        dtype = np.result_type(left.dtype, right.dtype)
        dtype = dtype if dtype in (np.dtype(np.uint16), np.dtype(np.int32)) else np.dtype(np.int32)
    out = output_path(args.dump_file, args.split, tokenizer_name, args.format)
    writer = CorpusWriter(
        out, args.format, vocab_size=vocab_size, tokenizer_name=Path(tokenizer_name.rstrip("/")).name,
        seed=args.seed, dtype=dtype, vocab_hash=left.vocab_hash or right.vocab_hash,
    )
    with writer:
        merge(left, right, writer)
    logger.info("wrote %s: %d sequences, %d tokens", out, writer.n_sequences, writer.n_tokens)
    return out


if __name__ == "__main__":
    run_cli(main)
