"""The one reader and writer of binarized corpora (token ids of many sequences, one file).

Two formats, told apart by the file's first bytes, not its name:

* ``mmap`` (default, extension ``.bin``): one memory-mappable file::

      [header, HEADER_SIZE bytes][tokens: n_tokens x dtype][pad to 8][starts: n_seqs x int64][lengths: n_seqs x int64]

  The header holds the magic bytes, the format version, the token dtype (uint16, or int32 when
  the vocabulary has more than 65,535 entries), the counts, the vocabulary size and a small JSON
  blob (tokenizer name, vocabulary fingerprint). The file size follows from the header, so a
  truncated file is caught on opening. Tokens are written as they come and the index last, so a
  corpus larger than RAM can be written; readers map the file (every DDP rank shares the same
  page-cached pages) and never load the tokens. Shuffling permutes the index, not the tokens.
* ``pickle``: exactly the original Causal-Distill format, a pickled Python list of ``np.uint16``
  arrays (``np.int32`` when the vocabulary has more than 65,535 entries), shuffled. Files written
  by the original scripts load as they are. The whole list lives in RAM.

``load_corpus(path)`` opens either; ``CorpusWriter`` writes either, atomically.
"""
from __future__ import annotations

import array
import contextlib
import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from atomic_files import atomic_open, clean_stale_temporaries, file_blake2b
from utils import CliError, logger

FORMATS = ("mmap", "pickle")
EXTENSIONS = {"mmap": "bin", "pickle": "pickle"}

MAGIC = b"CDTOKBIN"
VERSION = 1
HEADER_SIZE = 4096
# magic, version, dtype code, n_seqs, n_tokens, vocab_size (-1: unknown), index offset, json length
_HEADER = struct.Struct("<8sIIQQqQI")
_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
# The header's JSON records a blake2b (16 bytes) of every byte after the header, computed while writing.
# Files written before it existed have none and are read as before.
CHECKSUM_KEY = "blake2b_after_header"
_PICKLE_PROTO = 0x80  # every pickle of protocol 2 or more starts with the PROTO opcode

# Read granularity of full scans (token counts, unk counts): 16M tokens, 32 MiB of uint16.
SCAN_CHUNK = 1 << 24


def dtype_for_vocab(vocab_size: int | None) -> np.dtype:
    """uint16 when every id of a `vocab_size` vocabulary fits (as the original chose), else int32."""
    if vocab_size is not None and vocab_size < (1 << 16):
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def output_path(dump_file: str, split: str, tokenizer_name: str, fmt: str) -> Path:
    """`{dump_file}.{split}.{tokenizer}.{ext}`, where tokenizer is the name's last path component."""
    short = Path(str(tokenizer_name).rstrip("/\\")).name or str(tokenizer_name)
    return Path(f"{dump_file}.{split}.{short}.{EXTENSIONS[fmt]}")


class Corpus:
    """A read-only sequence of token-id sequences.

    Attributes: `lengths` (np.int64, one per sequence), `vocab_size` (int, or None when the file
    does not record it, as with pickles), `tokenizer_name`, `vocab_hash` (str or None), `n_tokens`,
    `dtype`, `path` (None in memory) and `format` ("mmap", "pickle" or "memory").

    Every sequence also has a place in one virtual flat token array: `starts[i]` is where
    sequence i begins and `iter_flat()` walks that array in order, so whole-corpus scans
    (token counts, unk counts) run in large vectorised chunks whatever the format.
    """

    format = "memory"
    path: Path | None = None
    vocab_size: int | None = None
    tokenizer_name: str | None = None
    vocab_hash: str | None = None
    lengths: np.ndarray
    starts: np.ndarray
    dtype: np.dtype

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    def iter_flat(self, chunk_tokens: int = SCAN_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """Yield `(offset, tokens)` covering the virtual flat array in order, about `chunk_tokens` at a time."""
        raise NotImplementedError

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """The tokens at `positions` of the virtual flat array (int64), in the order given."""
        positions = np.asarray(positions, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        sorted_pos = positions[order]
        out = np.empty(len(positions), dtype=self.dtype)
        for offset, chunk in self.iter_flat():
            lo, hi = np.searchsorted(sorted_pos, [offset, offset + len(chunk)])
            out[order[lo:hi]] = chunk[sorted_pos[lo:hi] - offset]
        return out

    def positions_of(self, token_id: int) -> np.ndarray:
        """Sorted int64 positions (in the virtual flat array) where `token_id` occurs."""
        found = [np.flatnonzero(chunk == token_id) + offset for offset, chunk in self.iter_flat()]
        return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)

    def max_id(self) -> int:
        """The largest token id (-1 for an empty corpus)."""
        return max((int(chunk.max()) for _, chunk in self.iter_flat() if len(chunk)), default=-1)

    def check_ids(self, vocab_size: int | None, flag: str | None = None) -> None:
        """CliError naming the file and the first sequence that holds a negative token id, or one of
        `vocab_size` or more (when given): a damaged or crafted file, or another tokenizer's corpus."""
        what = f"{flag} {self.path}" if flag else str(self.path)
        for offset, chunk in self.iter_flat():
            if not len(chunk):
                continue
            bad = chunk < 0
            if vocab_size is not None:
                bad |= chunk >= vocab_size
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                seq = int(np.searchsorted(self.starts, offset + k, side="right")) - 1
                tid = int(chunk[k])
                why = ("a token id is never negative (a damaged or crafted file)" if tid < 0 else
                       f"beyond the vocabulary of {vocab_size} entries: binarized with another tokenizer?")
                raise CliError(f"{what}: sequence {seq} holds token id {tid}, {why}")

    def describe(self) -> str:
        name = str(self.path) if self.path is not None else "<memory>"
        return f"{name} ({self.format}, {len(self)} sequences, {self.n_tokens} tokens)"


class InMemoryCorpus(Corpus):
    """A corpus held as a Python list of 1-D integer arrays (a loaded pickle, or data built in a test)."""

    def __init__(
        self,
        arrays: Sequence[np.ndarray],
        vocab_size: int | None = None,
        tokenizer_name: str | None = None,
        path: str | os.PathLike | None = None,
        fmt: str = "memory",
    ):
        self.arrays = [np.asarray(a) for a in arrays]
        for i, a in enumerate(self.arrays):
            if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"sequence {i} is not a 1-D integer array (shape {a.shape}, dtype {a.dtype})")
        self.lengths = np.fromiter((len(a) for a in self.arrays), dtype=np.int64, count=len(self.arrays))
        self.starts = np.zeros(len(self.arrays), dtype=np.int64)
        if len(self.arrays) > 1:
            np.cumsum(self.lengths[:-1], out=self.starts[1:])
        dtypes = {a.dtype for a in self.arrays}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else np.dtype(np.int64)
        self.vocab_size = vocab_size
        self.tokenizer_name = tokenizer_name
        self.path = Path(path) if path is not None else None
        self.format = fmt

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays[i]

    def iter_flat(self, chunk_tokens: int = SCAN_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        i, n = 0, len(self.arrays)
        while i < n:
            # Enough whole sequences to reach about chunk_tokens (at least one).
            j = int(np.searchsorted(self.starts, self.starts[i] + chunk_tokens, side="left"))
            j = min(max(j, i + 1), n)
            yield int(self.starts[i]), np.concatenate(self.arrays[i:j]) if j > i + 1 else self.arrays[i]
            i = j


class MmapCorpus(Corpus):
    """A corpus in the mmap format, memory-mapped read-only; nothing but the header is read eagerly.

    Pickling it (DataLoader workers, spawn) sends only the path; the copy maps the file again.
    """

    format = "mmap"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._open()

    def _open(self) -> None:
        path = self.path
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            raise CliError(f"{path}: truncated binarized corpus (header is {len(head)} of {HEADER_SIZE} bytes)")
        magic, version, code, n_seqs, n_tokens, vocab_size, index_offset, meta_len = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise CliError(f"{path}: not a binarized corpus (bad magic bytes)")
        if version != VERSION:
            raise CliError(f"{path}: binarized corpus format version {version}; this code reads version {VERSION}")
        if code not in _DTYPES or _HEADER.size + meta_len > HEADER_SIZE:
            raise CliError(f"{path}: corrupt binarized corpus header")
        dtype = _DTYPES[code]
        if index_offset != _align8(HEADER_SIZE + n_tokens * dtype.itemsize):
            raise CliError(f"{path}: corrupt binarized corpus header (inconsistent index offset)")
        expected = index_offset + 16 * n_seqs
        if size != expected:
            what = "truncated" if size < expected else "corrupt (trailing bytes)"
            raise CliError(
                f"{path}: {what} binarized corpus: the header promises {expected} bytes, the file has {size}"
            )
        try:
            meta = json.loads(head[_HEADER.size : _HEADER.size + meta_len].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CliError(f"{path}: corrupt binarized corpus header ({err})") from None
        self.dtype = dtype
        self.vocab_size = None if vocab_size < 0 else int(vocab_size)
        self.tokenizer_name = meta.get("tokenizer_name")
        self.vocab_hash = meta.get("vocab_hash")
        self.meta = meta
        self._n_tokens = int(n_tokens)
        if n_tokens:
            self._tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(n_tokens,))
        else:
            self._tokens = np.zeros(0, dtype=dtype)
        if n_seqs:
            self.starts = np.memmap(path, dtype="<i8", mode="r", offset=index_offset, shape=(n_seqs,))
            self.lengths = np.memmap(path, dtype="<i8", mode="r", offset=index_offset + 8 * n_seqs, shape=(n_seqs,))
        else:
            self.starts = self.lengths = np.zeros(0, dtype=np.int64)
        for i in range(0, n_seqs, SCAN_CHUNK):  # in chunks: the index of a big corpus is big too
            starts, lengths = np.asarray(self.starts[i : i + SCAN_CHUNK]), np.asarray(self.lengths[i : i + SCAN_CHUNK])
            if starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > n_tokens:
                raise CliError(f"{path}: corrupt binarized corpus (index points outside the token array)")

    @property
    def recorded_checksum(self) -> str | None:
        """The blake2b of the bytes after the header recorded when the file was written (None for older files)."""
        return self.meta.get(CHECKSUM_KEY)

    def verify_checksum(self, digest: str | None = None) -> bool:
        """Compare the recorded checksum with `digest` (or with one computed now: one read of the file).

        Returns False when the file records none; raises CliError when they differ.
        """
        recorded = self.recorded_checksum
        if recorded is None:
            return False
        digest = digest if digest is not None else file_blake2b(self.path, skip=HEADER_SIZE)
        if digest != recorded:
            raise CliError(f"{self.path}: the tokens differ from the checksum recorded when the file was written "
                           "(the file was modified or corrupted); binarize it again")
        return True

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.path = state["path"]
        self._open()

    @property
    def n_tokens(self) -> int:
        return self._n_tokens

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.starts[i])
        return self._tokens[start : start + int(self.lengths[i])]

    def iter_flat(self, chunk_tokens: int = SCAN_CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        for offset in range(0, self._n_tokens, chunk_tokens):
            yield offset, np.asarray(self._tokens[offset : offset + chunk_tokens])

    def gather(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self._tokens[np.asarray(positions, dtype=np.int64)])


def _align8(n: int) -> int:
    return (n + 7) // 8 * 8


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles lists of NumPy arrays and refuses every other global, so a pickle cannot run code."""

    _ALLOWED = {
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if module.startswith("numpy.core"):  # written by NumPy 1.x; NumPy 2 renamed the package
            module = "numpy._core" + module[len("numpy.core") :]
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only NumPy arrays are expected)")
        return super().find_class(module, name)


class _CountsUnpickler(_NumpyOnlyUnpickler):
    """A token counts pickle: a list of ints (the original's format) or a NumPy array, and nothing else."""


def load_token_counts(path: str | os.PathLike) -> np.ndarray:
    """Token counts (scripts/token_counts.py) from a pickle or a .npy file, as a 1-D int64 array.

    The pickle is read by a restricted unpickler (a list of ints or a NumPy integer array; no other
    global can be loaded, so a crafted file cannot run code) and the .npy with allow_pickle=False.
    Anything else, or non-integer or negative counts, is a CliError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CliError(f"{path}: token counts file not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with open(path, "rb") as fh:
            head = fh.read(6)
            fh.seek(0)
            if head == b"\x93NUMPY":
                data = np.load(fh, allow_pickle=False)
            else:
                data = _CountsUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, struct.error,
            OSError) as err:
        raise CliError(f"{path}: not a token counts file (a pickled list of ints or a .npy array): "
                       f"{type(err).__name__}: {err}") from None
    if isinstance(data, list) and not all(type(x) is int for x in data):
        raise CliError(f"{path}: token counts must be a list of integers")
    counts = np.asarray(data)
    if counts.ndim != 1 or not (np.issubdtype(counts.dtype, np.integer) or counts.size == 0):
        raise CliError(f"{path}: token counts must be a 1-D list or array of integers "
                       f"(found shape {counts.shape}, dtype {counts.dtype})")
    if counts.size and counts.min() < 0:
        raise CliError(f"{path}: token counts must be >= 0 (found {int(counts.min())})")
    return counts.astype(np.int64)


# A pickle holds no checksum: said once per file and process.
_WARNED_NO_CHECKSUM: set = set()


def warn_no_checksum(path: Path, what: str, advice: str) -> None:
    """Say that `path` (a pickle or .npy) carries no checksum, so that damage to it goes unnoticed."""
    key = str(Path(path).resolve())
    if key not in _WARNED_NO_CHECKSUM:
        _WARNED_NO_CHECKSUM.add(key)
        logger.warning("%s: %s carries no checksum: a flipped bit or a damaged copy is read without a word; %s",
                       path, what, advice)


def _load_pickle(path: Path) -> InMemoryCorpus:
    warn_no_checksum(path, "a pickled corpus", "the .bin format (binarized_data.py's default) records one and "
                     "every run checks it")
    try:
        with open(path, "rb") as fh:
            data = _NumpyOnlyUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, struct.error) as err:
        raise CliError(f"{path}: truncated or corrupt binarized pickle ({type(err).__name__}: {err})") from None
    if not isinstance(data, list):
        raise CliError(f"{path}: a binarized pickle must hold a list of arrays, found {type(data).__name__}")
    try:
        return InMemoryCorpus(data, path=path, fmt="pickle")
    except ValueError as err:
        raise CliError(f"{path}: {err}") from None


def require_corpus(path: str | os.PathLike, flag: str | None = None) -> Path:
    """`path` as a Path if it is a file; else CliError naming it, and the file a user most likely meant.

    binarized_data.py names its output `{dump_file}.{split}.{tokenizer}.{bin|pickle}` (`.bin` by
    default): when the `.pickle` asked for is missing and the `.bin` of the same stem exists (or the
    reverse), the message names that file; otherwise it lists corpora beside it with the same prefix.
    """
    path = Path(path)
    if path.is_file():
        return path
    what = f"{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise CliError(f"{what}: is a folder, not a binarized corpus file")
    hint = ""
    other = {".bin": ".pickle", ".pickle": ".bin"}.get(path.suffix)
    if other and path.with_suffix(other).is_file():
        hint = (
            f"; {path.with_suffix(other)} exists: the same corpus in the {other} format (binarized_data.py writes "
            f"{{dump_file}}.{{split}}.{{tokenizer}}.bin by default, .pickle with --format pickle); pass that file"
        )
    elif path.parent.is_dir():
        prefix = path.name.split(".", 1)[0]
        near = sorted(
            p.name for p in path.parent.iterdir()
            if p.name.startswith(prefix + ".") and p.suffix in (".bin", ".pickle") and p.is_file()
        )
        if near:
            hint = f"; binarized corpora beside it: {', '.join(near[:5])}" + (" ..." if len(near) > 5 else "")
    raise CliError(f"{what}: binarized corpus not found{hint}")


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Open a binarized corpus in either format, told apart by its first bytes.

    Returns an `MmapCorpus` (memory-mapped) or an `InMemoryCorpus` (pickle). A missing, truncated,
    corrupt or unknown file raises CliError naming it.
    """
    path = require_corpus(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC))
    except OSError as err:
        raise CliError(f"{path}: cannot read binarized corpus ({err.strerror})") from None
    if head == MAGIC:
        return MmapCorpus(path)
    if head[:1] == bytes([_PICKLE_PROTO]):
        return _load_pickle(path)
    if not head:
        raise CliError(f"{path}: empty file, not a binarized corpus")
    raise CliError(f"{path}: unknown format (neither a {EXTENSIONS['mmap']} corpus nor a pickle)")


class CorpusWriter:
    """Write a binarized corpus atomically: a temporary file beside `path`, renamed on success.

    `CorpusWriter(path, fmt="mmap", vocab_size=..., tokenizer_name=..., seed=0)` used as a context
    manager; `add(ids)` appends one sequence, `add_batch(flat, lengths)` many at once. On leaving
    the block the sequences are shuffled with `seed` (`shuffle=False` keeps their order) and the
    file appears under `path`; on an exception nothing is left under `path`.

    mmap streams tokens to disk as they come and keeps only the lengths (8 bytes a sequence) in
    RAM; pickle keeps every array in RAM, as the format requires. The token dtype follows from
    `vocab_size` (uint16 below 65,536 entries, else int32) unless `dtype` is given. Ids outside
    [0, vocab_size) raise ValueError.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fmt: str = "mmap",
        vocab_size: int | None = None,
        tokenizer_name: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        dtype: np.dtype | str | None = None,
        vocab_hash: str | None = None,
    ):
        if fmt not in FORMATS:
            raise ValueError(f"unknown corpus format {fmt!r}; expected one of {FORMATS}")
        self.path = Path(path)
        self.fmt = fmt
        self.vocab_size = vocab_size
        self.tokenizer_name = tokenizer_name
        self.vocab_hash = vocab_hash
        self.seed = seed
        self.shuffle = shuffle
        self.dtype = np.dtype(dtype) if dtype is not None else dtype_for_vocab(vocab_size)
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"token dtype must be uint16 or int32, not {self.dtype}")
        self._limit = vocab_size if vocab_size is not None else int(np.iinfo(self.dtype).max) + 1
        self._stack: contextlib.ExitStack | None = None
        self._fh: io.BufferedWriter | None = None
        self._lengths = array.array("q")
        self._arrays: list[np.ndarray] = []
        self._digest = hashlib.blake2b(digest_size=16)  # of every byte after the header, as written
        self.n_tokens = 0

    @property
    def n_sequences(self) -> int:
        return len(self._lengths)

    def __enter__(self) -> CorpusWriter:
        clean_stale_temporaries(self.path.parent, self.path.name)  # left by a writer of this file that was killed
        self._stack = contextlib.ExitStack()
        self._fh = self._stack.enter_context(atomic_open(self.path, "wb"))
        if self.fmt == "mmap":
            self._fh.write(b"\0" * HEADER_SIZE)  # patched in _finish; the temp name hides it meanwhile
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack, self._stack = self._stack, None
        if exc_type is None:
            try:
                self._finish()
            except BaseException as err:
                stack.__exit__(type(err), err, err.__traceback__)  # removes the temporary file
                raise
        return stack.__exit__(exc_type, exc, tb)

    def _check(self, ids: np.ndarray) -> np.ndarray:
        if ids.ndim != 1:
            raise ValueError(f"token ids must be 1-D, got shape {ids.shape}")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self._limit):
            bad = int(ids.max()) if int(ids.max()) >= self._limit else int(ids.min())
            raise ValueError(f"token id {bad} outside [0, {self._limit}) for {self.path}")
        return ids.astype(self.dtype, copy=False)

    def add(self, ids) -> None:
        """Append one sequence of token ids."""
        ids = self._check(np.asarray(ids))
        self._lengths.append(len(ids))
        self.n_tokens += len(ids)
        if self.fmt == "mmap":
            self._write(ids.tobytes())
        else:
            self._arrays.append(ids.copy())

    def add_batch(self, flat, lengths) -> None:
        """Append `len(lengths)` sequences whose ids lie back to back in `flat`."""
        flat = self._check(np.asarray(flat))
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(flat):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(flat)} ids were given")
        self._lengths.extend(lengths.tolist())
        self.n_tokens += len(flat)
        if self.fmt == "mmap":
            self._write(flat.tobytes())
        else:
            self._arrays.extend(np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else [])

    def _write(self, data: bytes) -> None:
        self._fh.write(data)
        self._digest.update(data)

    def _order(self, n: int) -> np.ndarray:
        if self.shuffle:
            return np.random.default_rng(self.seed).permutation(n)
        return np.arange(n)

    def _finish(self) -> None:
        n = len(self._lengths)
        order = self._order(n)
        if self.fmt == "pickle":
            data = [self._arrays[i] for i in order]
            pickle.dump(data, self._fh, protocol=pickle.HIGHEST_PROTOCOL)
            return
        lengths = np.frombuffer(self._lengths, dtype=np.int64) if n else np.zeros(0, np.int64)
        starts = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lengths[:-1], out=starts[1:])
        end_tokens = HEADER_SIZE + self.n_tokens * self.dtype.itemsize
        index_offset = _align8(end_tokens)
        self._write(b"\0" * (index_offset - end_tokens))
        self._write(starts[order].astype("<i8").tobytes())
        self._write(lengths[order].astype("<i8").tobytes())
        meta = json.dumps({"tokenizer_name": self.tokenizer_name, "vocab_hash": self.vocab_hash, "seed": self.seed,
                           "shuffled": self.shuffle, CHECKSUM_KEY: self._digest.hexdigest()}).encode("utf-8")
        if _HEADER.size + len(meta) > HEADER_SIZE:
            raise ValueError(f"tokenizer name too long for the {HEADER_SIZE}-byte header: {self.tokenizer_name!r}")
        vocab = -1 if self.vocab_size is None else int(self.vocab_size)
        code = _DTYPE_CODES[self.dtype]
        header = _HEADER.pack(MAGIC, VERSION, code, n, self.n_tokens, vocab, index_offset, len(meta))
        self._fh.seek(0)
        self._fh.write(header + meta)
        self._fh.seek(0, os.SEEK_END)


def vocab_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id pairs), to tell vocabularies apart."""
    import hashlib

    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256("\n".join(f"{i}\t{t}" for t, i in items).encode("utf-8")).hexdigest()
    return digest[:16]
