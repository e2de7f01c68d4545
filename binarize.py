"""Text to token-id sequences, the library of scripts/binarized_data.py: the text sources (local files
or the hub), the tokenizer and the ids that open and close an example, encoding in batches (serially
or over processes, same bytes either way) and writing a corpus (`binarized_io.CorpusWriter`)."""
from __future__ import annotations

import multiprocessing
import os
import time
from itertools import chain
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from binarized_io import CorpusWriter, dtype_for_vocab, vocab_fingerprint
from input_checks import check_local_path, check_tokenizer
from utils import CliError, logger, progress_bar, require_file

# Which special tokens open and close an example, per tokenizer family.
SPECIAL_TOKENS = {
    "bert": ("cls_token", "sep_token"),  # [CLS] ... [SEP]
    "roberta": ("cls_token", "sep_token"),  # <s> ... </s>
    "gpt2": ("bos_token", "eos_token"),  # <|endoftext|> ... <|endoftext|>
}
# Llama-layout causal LMs: the tokenizer's BOS ... EOS (ids above 65,535 are stored as int32).
LLAMA_LAYOUT_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "olmo2", "smollm3")
SPECIAL_TOKENS.update({name: ("bos_token", "eos_token") for name in LLAMA_LAYOUT_TYPES})


def special_ids(tokenizer, tokenizer_type: str) -> tuple[int | None, int | None]:
    """(opening id, closing id) of an example; a Llama-layout tokenizer without a BOS opens with its EOS."""
    bos_attr, eos_attr = SPECIAL_TOKENS[tokenizer_type]
    bos_id, eos_id = getattr(tokenizer, f"{bos_attr}_id", None), getattr(tokenizer, f"{eos_attr}_id", None)
    if bos_id is None and tokenizer_type in LLAMA_LAYOUT_TYPES:
        bos_id = eos_id
    return bos_id, eos_id
# `--dataset_name` shorthands: name -> (hub name, config).
DATASET_ALIASES = {"wikitext": ("wikitext", "wikitext-103-raw-v1")}
# Local file loaders of `datasets`, by extension; any other single file is read as plain text.
LOADERS = {
    ".txt": "text", ".text": "text", ".raw": "text", ".tokens": "text",
    ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet",
}


def load_tokenizer_and_wrap_ids(name: str, tokenizer_type: str, cache_dir: str | None = None):
    """Load a fast tokenizer (hub name or local folder) and return `(tokenizer, bos_id, eos_id)`."""
    from transformers import AutoConfig, AutoTokenizer

    check_local_path(name, "--tokenizer_name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir, use_fast=True)
    except Exception as err:  # noqa: BLE001 -- transformers raises many types; all mean "cannot load"
        raise CliError(f"--tokenizer_name {name}: cannot load the tokenizer ({type(err).__name__}: {err})") from None
    config = None
    if (Path(name).expanduser() / "config.json").is_file():  # a model folder: check the tokenizer against it
        try:
            config = AutoConfig.from_pretrained(name)
        except Exception:  # noqa: BLE001 -- a config.json that is not a model's: nothing to compare with
            config = None
    check_tokenizer(tokenizer, config, tokenizer_flag="--tokenizer_name", tokenizer_name=name,
                    model_name=f"the model in {name}")
    if not getattr(tokenizer, "is_fast", False):
        raise CliError(f"--tokenizer_name {name}: no fast (Rust) implementation of this tokenizer is available")
    ids = special_ids(tokenizer, tokenizer_type)
    for attr, token_id in zip(SPECIAL_TOKENS[tokenizer_type], ids):
        if token_id is None:
            raise CliError(f"--tokenizer_name {name}: has no {attr}, which --tokenizer_type {tokenizer_type} needs")
    return tokenizer, int(ids[0]), int(ids[1])


def encode_batch(texts: Sequence[str | None], tokenizer, bos_id: int, eos_id: int, dtype=np.int32):
    """Tokenize a batch and wrap each example in `bos_id ... eos_id`.

    Empty and whitespace-only texts (and texts that tokenize to nothing) are skipped. Returns
    `(flat, lengths, n_skipped)`: the kept sequences back to back in one `dtype` array, their
    lengths (int64), and how many texts were skipped.
    """
    kept = [t.strip() for t in texts if t is not None]
    kept = [t for t in kept if t]
    ids = tokenizer(kept, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)[
        "input_ids"
    ] if kept else []
    ids = [x for x in ids if x]
    lengths = np.fromiter((len(x) + 2 for x in ids), dtype=np.int64, count=len(ids))
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=dtype)
    inner = np.ones(len(flat), dtype=bool)
    inner[ends - lengths] = False
    inner[ends - 1] = False
    flat[ends - lengths] = bos_id
    flat[ends - 1] = eos_id
    flat[inner] = np.fromiter(chain.from_iterable(ids), dtype=np.int64, count=int(inner.sum()))
    return flat, lengths, len(texts) - len(ids)


def binarize(texts: Iterable[str], tokenizer, tokenizer_type: str = "bert", batch_size: int = 1000) -> list[np.ndarray]:
    """Binarize `texts` in memory (no shuffling): one `[bos] ids [eos]` array per non-empty text."""
    bos_id, eos_id = special_ids(tokenizer, tokenizer_type)
    dtype = dtype_for_vocab(len(tokenizer))
    out: list[np.ndarray] = []
    texts = list(texts)
    for i in range(0, len(texts), batch_size):
        flat, lengths, _ = encode_batch(texts[i : i + batch_size], tokenizer, bos_id, eos_id, dtype)
        out.extend(np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else [])
    return out


# ---------------------------------------------------------------------------------------------
# Input sources


def _load_local(path: Path, split: str, cache_dir: str | None) -> list[tuple[str, object]]:
    """`[(description, datasets.Dataset)]` for a local path (folder or file)."""
    import datasets

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001
            raise CliError(f"--file_path {path}: cannot load this save_to_disk folder ({err})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise CliError(f"--file_path {path}: no split {split!r}; available splits: {', '.join(loaded)}")
            return [(f"{path} [{split}]", loaded[split])]
        return [(str(path), loaded)]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix in LOADERS)
        if not files:
            raise CliError(
                f"--file_path {path}: the folder holds neither a save_to_disk dataset nor any "
                f"{'/'.join(sorted(LOADERS))} file"
            )
    else:
        files = [path]
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(LOADERS.get(f.suffix.lower(), "text"), []).append(f)
    sources = []
    for loader, group in groups.items():
        what = ", ".join(map(str, group)) if len(group) <= 3 else f"{len(group)} {loader} files in {path}"
        try:
            ds = datasets.load_dataset(loader, data_files=[str(f) for f in group], split="train", cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 -- arrow/pandas/json errors, all meaning "unreadable"
            cause = err.__cause__ or err
            raise CliError(f"--file_path {what}: cannot read as {loader} ({type(cause).__name__}: {cause})") from None
        sources.append((what, ds))
    return sources


def _load_hub(names: str, split: str, cache_dir: str | None) -> list[tuple[str, object]]:
    import datasets

    sources = []
    for name in names.split("+"):
        hub_name, config = DATASET_ALIASES.get(name, (name.split(":")[0], name.split(":")[1] if ":" in name else None))
        logger.info("loading %s%s (split %s) from the hub", hub_name, f" ({config})" if config else "", split)
        try:
            ds = datasets.load_dataset(hub_name, config, split=split, cache_dir=cache_dir)
        except ValueError as err:
            raise CliError(f"--dataset_name {name}: {err}") from None
        except Exception as err:  # noqa: BLE001 -- not found, offline, gated: all mean "cannot load"
            raise CliError(f"--dataset_name {name}: cannot load the dataset ({type(err).__name__}: {err})") from None
        sources.append((name, ds))
    return sources


def load_sources(args) -> list[tuple[str, object]]:
    """The datasets to binarize, in order, each checked to have a text field `--field_name`."""
    if args.file_path is not None:
        path = require_file(args.file_path, "--file_path")
        sources = _load_local(path, args.split, args.cache_dir)
    else:
        sources = _load_hub(args.dataset_name, args.split, args.cache_dir)
    for what, ds in sources:
        if args.field_name not in ds.column_names:
            raise CliError(
                f"{what}: no field {args.field_name!r} (--field_name); available fields: {', '.join(ds.column_names)}"
            )
        feature = ds.features[args.field_name]
        if getattr(feature, "dtype", None) not in ("string", "large_string"):
            raise CliError(f"{what}: field {args.field_name!r} holds {feature}, not text")
    return sources


def iter_text_batches(sources, field: str, batch_size: int, max_examples: int = -1) -> Iterator[list]:
    """Batches of `field` values over the sources in order, stopping after `max_examples` rows (-1: all)."""
    remaining = max_examples if max_examples >= 0 else float("inf")
    for _, ds in sources:
        n = int(min(len(ds), remaining))
        column = ds.select_columns([field])
        for start in range(0, n, batch_size):
            yield column[start : min(start + batch_size, n)][field]
        remaining -= n
        if remaining <= 0:
            return


# ---------------------------------------------------------------------------------------------
# Serial and multi-process encoding; both yield the same (flat, lengths, n_skipped) per batch.

_WORKER: dict = {}


def _init_worker(tokenizer, bos_id, eos_id, dtype) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    _WORKER.update(tokenizer=tokenizer, bos_id=bos_id, eos_id=eos_id, dtype=dtype)


def _encode_in_worker(texts):
    w = _WORKER
    return encode_batch(texts, w["tokenizer"], w["bos_id"], w["eos_id"], w["dtype"])


def iter_encoded(batches: Iterable[list], tokenizer, bos_id, eos_id, dtype, num_workers: int = 1) -> Iterator:
    """Encode text batches in order, serially or over `num_workers` processes."""
    if num_workers <= 1:
        for texts in batches:
            yield encode_batch(texts, tokenizer, bos_id, eos_id, dtype)
        return
    # Work goes out in windows of a few batches per process so that memory stays bounded and
    # results come back in input order (the ids are the serial path's, byte for byte).
    window = 4 * num_workers
    with multiprocessing.Pool(num_workers, _init_worker, (tokenizer, bos_id, eos_id, dtype)) as pool:
        pending: list = []
        for texts in chain(batches, [None]):
            if texts is not None:
                pending.append(texts)
            if pending and (len(pending) == window or texts is None):
                yield from pool.imap(_encode_in_worker, pending)
                pending = []


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def count_rows(sources, max_examples: int) -> int:
    total = sum(len(ds) for _, ds in sources)
    return total if max_examples < 0 else min(total, max_examples)


def write_corpus(out: Path, fmt: str, sources, field: str, batch_size: int, max_examples: int, tokenizer,
                 tokenizer_name: str, bos_id: int, eos_id: int, dtype, workers: int, seed: int,
                 source_name: str) -> tuple[CorpusWriter, int, float]:
    """Encode every example of `sources` (field `field`) and write the corpus `out` (shuffled with `seed`).

    Returns (the closed writer, with its counts; examples skipped as empty; seconds taken). CliError when no
    example is left to write."""
    start = time.perf_counter()
    n_skipped = 0
    batches = iter_text_batches(sources, field, batch_size, max_examples)
    writer = CorpusWriter(
        out, fmt, vocab_size=len(tokenizer), tokenizer_name=Path(str(tokenizer_name).rstrip("/")).name,
        seed=seed, vocab_hash=vocab_fingerprint(tokenizer),
    )
    with writer, progress_bar(total=count_rows(sources, max_examples), unit="ex", desc="binarizing",
                              mininterval=2.0) as bar:
        for flat, lengths, skipped in iter_encoded(batches, tokenizer, bos_id, eos_id, dtype, workers):
            writer.add_batch(flat, lengths)
            n_skipped += skipped
            bar.update(len(lengths) + skipped)
        if writer.n_sequences == 0:
            raise CliError(f"{source_name}: no non-empty example to binarize in field {field!r}")
    return writer, n_skipped, time.perf_counter() - start
