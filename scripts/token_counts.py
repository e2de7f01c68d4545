"""Count every token id of a binarized corpus, for smoothing the MLM masking probabilities (cf. XLM, word2vec).

Reads either format (memory-mapped .bin or the original pickle) and writes, as the original did,
a pickled Python list of --vocab_size ints: the number of occurrences of each id (or a .npy array
when --token_counts_dump ends in .npy). The count runs
with np.bincount over large chunks, so a memory-mapped corpus is never loaded whole.

Example:
  python scripts/token_counts.py --data_file data/binarized_text.train.bert-base-uncased.bin \\
      --token_counts_dump data/token_counts.bert-base-uncased.pickle
"""
from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from atomic_files import atomic_open
from binarized_io import Corpus, load_corpus
from utils import CliError, check_output_parent, check_writable, logger, run_cli

# The original's default, used for a pickle (which records no vocabulary size) without --vocab_size.
DEFAULT_VOCAB_SIZE = 30522
# The largest --vocab_size taken (the largest tokenizers have a few hundred thousand entries; the
# counts of 2**24 ids take 128 MiB).
MAX_VOCAB_SIZE = 1 << 24


def count_tokens(corpus: Corpus, vocab_size: int) -> np.ndarray:
    """Occurrences of each id in [0, vocab_size) over the corpus (int64); an id >= vocab_size is a CliError."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for _, chunk in corpus.iter_flat():
        if not len(chunk):
            continue
        top = int(chunk.max())
        if top >= vocab_size or int(chunk.min()) < 0:
            bad = top if top >= vocab_size else int(chunk.min())
            raise CliError(f"{corpus.path}: token id {bad} is outside the vocabulary of --vocab_size {vocab_size}")
        counts += np.bincount(chunk, minlength=vocab_size)
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data_file",
        required=True,
        help="The binarized corpus (.bin or .pickle): binarized_data.py writes {dump_file}.{split}.{tokenizer}.bin, "
        "or .pickle with --format pickle, where {tokenizer} is the last path component of its --tokenizer_name.",
    )
    parser.add_argument("--token_counts_dump", required=True,
                        help="The file to write: a pickle of a list of vocab_size ints (the original's format), or a "
                             ".npy array when the name ends in .npy. causal_train.py --token_counts reads both.")
    parser.add_argument(
        "--vocab_size",
        type=int,
        default=None,
        help="Vocabulary size (default: the one the .bin file records; for a pickle, 30522 as in the original). "
             "With a .bin it must equal the recorded size (a corpus of another tokenizer is refused here, not at "
             "training), unless --allow_vocab_mismatch.",
    )
    parser.add_argument("--allow_vocab_mismatch", action="store_true",
                        help="Take a --vocab_size other than the one the .bin records: for a model whose embedding "
                             "table is padded beyond its tokenizer (causal_train.py wants one count per row).")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = check_writable(check_output_parent(args.token_counts_dump, "--token_counts_dump"), "--token_counts_dump")
    if args.vocab_size is not None and not 1 <= args.vocab_size <= MAX_VOCAB_SIZE:
        raise CliError(f"--vocab_size must be between 1 and {MAX_VOCAB_SIZE:,} (no tokenizer is larger), "
                       f"not {args.vocab_size}")
    corpus = load_corpus(args.data_file)
    vocab_size = args.vocab_size
    if vocab_size is None:
        vocab_size = corpus.vocab_size or DEFAULT_VOCAB_SIZE
        logger.info("vocabulary size %d (%s)", vocab_size, "recorded in the file" if corpus.vocab_size else "default")
    elif corpus.vocab_size is not None and corpus.vocab_size != vocab_size and not args.allow_vocab_mismatch:
        raise CliError(f"--vocab_size {vocab_size} differs from the {corpus.vocab_size} entries of the tokenizer that "
                       f"binarized --data_file {corpus.path} (recorded in it): leave --vocab_size out to use "
                       f"{corpus.vocab_size}; for a model whose embedding table is padded beyond its tokenizer, add "
                       f"--allow_vocab_mismatch")
    if vocab_size < 1:
        raise CliError(f"--vocab_size must be positive, not {vocab_size}")
    logger.info("counting tokens of %s", corpus.describe())
    counts = count_tokens(corpus, vocab_size)
    if not counts.any():
        raise CliError(f"--data_file {corpus.path} holds no token: nothing to count (binarize a non-empty corpus)")
    with atomic_open(out, "wb") as fh:
        if out.suffix == ".npy":
            np.save(fh, counts)
        else:
            pickle.dump(counts.tolist(), fh, protocol=pickle.HIGHEST_PROTOCOL)
    logger.info("wrote %s: %d tokens, %d distinct ids", out, int(counts.sum()), int(np.count_nonzero(counts)))
    return out


if __name__ == "__main__":
    run_cli(main)
