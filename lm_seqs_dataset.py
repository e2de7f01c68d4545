"""Dataset of token-id sequences for distillation, each base sequence paired with a source sequence.

Adapted from the original Causal-Distill / HuggingFace distillation `LmSeqsDataset` (itself after
Facebook's XLM). The corpus is never copied: the dataset keeps three index arrays (sequence,
content start, content end) per item and reads tokens on demand, so a memory-mapped corpus stays
on disk (in the page cache shared by every DDP rank).
"""
from __future__ import annotations

import contextlib
import os
import signal
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from binarized_io import Corpus, InMemoryCorpus, load_corpus
from utils import CliError, logger

DATA_FRACTION_SEED = 20220710  # the part --data_fraction keeps does not depend on --seed


def derangement(n: int, seed: int, epoch: int) -> np.ndarray:
    """A permutation `p` of range(n) with `p[i] != i` for every i, drawn from `(seed, epoch)` only.

    A random order of the items is turned into one cycle: each item's partner is the next item in
    that order. Needs n >= 2.
    """
    if n < 2:
        raise CliError(f"pairing base and source sequences needs at least 2 sequences, the dataset has {n}")
    order = np.random.default_rng([seed, epoch]).permutation(n)
    pairing = np.empty(n, dtype=np.int64)
    pairing[order] = np.roll(order, -1)
    return pairing


def collate_sequences(batch: Sequence[tuple[np.ndarray, ...]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch of `(base_ids,)` or `(base_ids, source_ids)` items into int64 tensors.

    Returns `base_ids` (B, L) padded with `pad_id` to the longest base, `base_lengths` (B,), and
    for pairs `source_ids` (B, L) with the same L (each source padded or cut to it) and
    `source_lengths` (B,) (a cut source's length is L).
    """
    base = [item[0] for item in batch]
    base_lengths = np.fromiter((len(b) for b in base), dtype=np.int64, count=len(base))
    width = int(base_lengths.max()) if len(base) else 0
    base_ids = np.full((len(base), width), pad_id, dtype=np.int64)
    for row, ids in enumerate(base):
        base_ids[row, : len(ids)] = ids
    out = {"base_ids": torch.from_numpy(base_ids), "base_lengths": torch.from_numpy(base_lengths)}
    if len(batch) and len(batch[0]) > 1:
        source = [item[1] for item in batch]
        source_lengths = np.fromiter((min(len(s), width) for s in source), dtype=np.int64, count=len(source))
        source_ids = np.full((len(source), width), pad_id, dtype=np.int64)
        for row, (ids, n) in enumerate(zip(source, source_lengths)):
            source_ids[row, :n] = ids[:n]
        out["source_ids"] = torch.from_numpy(source_ids)
        out["source_lengths"] = torch.from_numpy(source_lengths)
    return out


class LmSeqsDataset(Dataset):
    """Cleaned, optionally paired, sequences of a binarized corpus.

    Cleaning (as the original, logged rule by rule):
      * a sequence longer than `max_model_input_size` is split into chunks of at most that many
        tokens, each re-wrapped in `cls_id ... sep_id`; no token is dropped;
      * a sequence (or chunk) shorter than `min_length` tokens is dropped;
      * a sequence with half or more of its tokens equal to `unk_id` is dropped.
    Every sequence must start with `cls_id` and end with `sep_id` (a CliError says otherwise).

    `__getitem__(i)` returns `(base_ids, source_ids)` when `paired` (the source is item
    `pairing[i]`, never i itself) or `(base_ids,)`; ids keep the corpus dtype. `set_epoch(e)`
    redraws `pairing` from `(seed, e)` alone, so every DDP rank holds the same pairs.
    `lengths` holds the item lengths; `batch_sequences` is the DataLoader collate_fn.
    """

    def __init__(
        self,
        *,
        data: str | os.PathLike | Corpus | Sequence[np.ndarray],
        max_model_input_size: int,
        cls_id: int,
        sep_id: int,
        pad_id: int,
        unk_id: int | None,
        seed: int = 0,
        paired: bool = True,
        min_length: int = 12,
        fraction: float = 1.0,
    ):
        if max_model_input_size < 3:
            raise ValueError(f"max_model_input_size must be at least 3, not {max_model_input_size}")
        if isinstance(data, (str, os.PathLike)):
            corpus = load_corpus(data)
        elif isinstance(data, Corpus):
            corpus = data
        else:
            corpus = InMemoryCorpus(list(data))
        self.corpus = corpus
        self.max_model_input_size = int(max_model_input_size)
        self.cls_id, self.sep_id, self.pad_id, self.unk_id = int(cls_id), int(sep_id), int(pad_id), unk_id
        self.seed = int(seed)
        self.paired = bool(paired)
        self.min_length = int(min_length)

        self._check_wrapping()
        self._split_long_sequences()
        self._remove_short_sequences()
        self._remove_unknown_sequences()
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1], not {fraction}")
        if fraction < 1.0:
            self._keep_fraction(fraction)
        self.lengths = self._item_lengths()
        logger.info("%d sequences, %d tokens after cleaning %s", len(self), int(self.lengths.sum()), corpus.describe())
        if len(self) < (2 if self.paired else 1):
            raise CliError(f"{corpus.describe()}: {len(self)} usable sequence(s) after cleaning (sequences of fewer "
                           f"than {self.min_length} tokens, or with half their tokens unknown, are removed); "
                           + ("pairing a base with a source needs at least 2" if self.paired else "nothing to train on"))
        self.epoch = 0
        self.pairing = derangement(len(self), self.seed, 0) if self.paired else None

    # ---- cleaning: everything below works on the index arrays, never on a copy of the corpus

    def _check_wrapping(self) -> None:
        lengths = np.asarray(self.corpus.lengths, dtype=np.int64)
        starts = np.asarray(self.corpus.starts, dtype=np.int64)
        ok = lengths >= 2
        first = self.corpus.gather(starts[ok])
        last = self.corpus.gather(starts[ok] + lengths[ok] - 1)
        good = np.zeros(len(lengths), dtype=bool)
        good[ok] = (first == self.cls_id) & (last == self.sep_id)
        if not good.all():
            bad = np.flatnonzero(~good)
            raise CliError(
                f"{self.corpus.describe()}: {len(bad)} sequences (the first is #{bad[0]}) do not start with "
                f"cls_id {self.cls_id} and end with sep_id {self.sep_id}; was the corpus binarized with "
                "another tokenizer or --tokenizer_type?"
            )
        # An item is cls_id + tokens[start:end] of its sequence + sep_id (int32 offsets: 16 bytes an item).
        self.seq_index = np.arange(len(lengths), dtype=np.int64)
        self.content_start = np.ones(len(lengths), dtype=np.int32)
        self.content_end = (lengths - 1).astype(np.int32)

    def _item_lengths(self) -> np.ndarray:
        """Item lengths, the two special tokens included (int64)."""
        return self.content_end.astype(np.int64) - self.content_start + 2

    def _keep(self, mask: np.ndarray) -> None:
        self.seq_index = self.seq_index[mask]
        self.content_start = self.content_start[mask]
        self.content_end = self.content_end[mask]

    def _split_long_sequences(self) -> None:
        """Split each over-long sequence into equal chunks of at most max_model_input_size tokens."""
        room = self.max_model_input_size - 2
        content = self.content_end.astype(np.int64) - self.content_start
        n_chunks = np.maximum(1, -(-content // room))  # ceil
        long = n_chunks > 1
        logger.info("splitting %d sequences longer than %d tokens", int(long.sum()), self.max_model_input_size)
        if not long.any():
            return
        item = np.repeat(np.arange(len(content)), n_chunks)
        chunk = np.arange(len(item)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
        # Chunk k of c over n tokens covers [k*n//c, (k+1)*n//c): sizes differ by at most one.
        c, n = n_chunks[item], content[item]
        self.seq_index = self.seq_index[item]
        base = self.content_start[item].astype(np.int64)
        self.content_start = (base + chunk * n // c).astype(np.int32)
        self.content_end = (base + (chunk + 1) * n // c).astype(np.int32)

    def _remove_short_sequences(self) -> None:
        keep = self._item_lengths() >= self.min_length
        logger.info("removing %d sequences shorter than %d tokens", int((~keep).sum()), self.min_length)
        self._keep(keep)

    def _remove_unknown_sequences(self) -> None:
        if self.unk_id is None:
            return
        unk_positions = self.corpus.positions_of(self.unk_id)
        offsets = np.asarray(self.corpus.starts, dtype=np.int64)[self.seq_index]
        n_unk = np.searchsorted(unk_positions, offsets + self.content_end) - np.searchsorted(
            unk_positions, offsets + self.content_start
        )
        keep = n_unk / self._item_lengths() < 0.5
        logger.info("removing %d sequences with 50%% or more unknown tokens", int((~keep).sum()))
        self._keep(keep)

    def _keep_fraction(self, fraction: float) -> None:
        """Keep the items of a share `fraction` of the corpus's sequences (all chunks of a kept one): the first of a
        permutation drawn from a fixed seed, not the run's, so that every run, arm and seed trains on the same part."""
        n = len(self.corpus.lengths)
        chosen = np.random.default_rng(DATA_FRACTION_SEED).permutation(n)[:max(1, round(fraction * n))]
        before = len(self.seq_index)
        self._keep(np.isin(self.seq_index, chosen))
        logger.info("--data_fraction %g: %d of %d corpus sequences kept, %d of %d items", fraction, len(chosen), n,
                    len(self.seq_index), before)

    # ---- access

    def __len__(self) -> int:
        return len(self.seq_index)

    def item_ids(self, i: int) -> np.ndarray:
        """Token ids of item i: cls_id, its slice of the corpus, sep_id."""
        tokens = self.corpus[int(self.seq_index[i])]
        start, end = int(self.content_start[i]), int(self.content_end[i])
        ids = np.empty(end - start + 2, dtype=tokens.dtype)
        ids[0], ids[-1] = self.cls_id, self.sep_id
        ids[1:-1] = tokens[start:end]
        return ids

    def __getitem__(self, i: int) -> tuple[np.ndarray, ...]:
        if self.paired:
            return self.item_ids(i), self.item_ids(int(self.pairing[i]))
        return (self.item_ids(i),)

    def set_epoch(self, epoch: int) -> None:
        """Redraw the base/source pairs for `epoch` (the same on every rank)."""
        self.epoch = int(epoch)
        if self.paired:
            self.pairing = derangement(len(self), self.seed, self.epoch)

    def batch_sequences(self, batch: Sequence[tuple[np.ndarray, ...]]) -> dict[str, torch.Tensor]:
        """Collate items into padded int64 tensors (see `collate_sequences`)."""
        return collate_sequences(batch, self.pad_id)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the worker ignores SIGINT and SIGTERM (the main process owns the shutdown).

    A scheduler's SIGTERM goes to the whole process group; a worker that died of it would make the
    main process fail ("DataLoader worker ... is killed by signal") instead of finishing its step
    and writing the stop checkpoint. Ignoring a signal also drops one pending while it was blocked
    (see `stop_signals_blocked`). The worker still ends when the main process closes the loader.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def stop_signals_blocked():
    """Block SIGINT/SIGTERM in this thread while DataLoader workers are forked (they inherit the mask).

    A signal arriving meanwhile is delivered to this process when the block ends, and stays
    pending, then dropped, in a worker until `ignore_stop_signals` has run: no window where a
    fresh worker can die of it.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no fork)
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def make_loader(dataset: LmSeqsDataset, batches: list[list[int]], num_workers: int, seed: int) -> DataLoader:
    """A DataLoader that collates `batches` (lists of item indices) in order."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=dataset.batch_sequences,
        num_workers=num_workers,
        persistent_workers=False,
        # Its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run would see different masks and positions than the run that never stopped.
        generator=torch.Generator().manual_seed(seed),
        # The main process owns the shutdown: a SIGTERM to the whole process group (Slurm,
        # Kubernetes, docker stop) must not kill the workers before the stop checkpoint.
        worker_init_fn=ignore_stop_signals if num_workers > 0 else None,
    )


def collated_batches(dataset: LmSeqsDataset, batches: list[list[int]], *, num_workers: int, seed: int,
                     stopping: Callable[[], bool]) -> Iterator[dict[str, torch.Tensor]]:
    """Yield the collated `batches` in order, through `num_workers` DataLoader workers (`make_loader`).

    Workers ignore SIGINT/SIGTERM/SIGHUP and are started with those signals blocked (so none can
    arrive before a worker has set that up). Should a worker die anyway (killed on its own, or
    while the run is stopping: `stopping()`), the loader notices it while a batch is awaited
    (`worker_deaths_surface_here`) and the remaining batches are collated in this process (collation
    draws no random numbers, so the data are the same): the run goes on, or writes its stop checkpoint.
    """
    n_done = 0
    try:
        if num_workers > 0:
            worker_deaths_surface_here()
        with stop_signals_blocked():  # the workers are forked here and inherit the blocked mask
            iterator = iter(make_loader(dataset, batches, num_workers, seed))
        for batch in iterator:
            n_done += 1
            yield batch
    except (RuntimeError, EOFError, ConnectionError) as err:
        # A dead worker surfaces as torch's RuntimeError, or, killed while handing a batch over (its tensors travel
        # through a socket of its own), as an EOFError or a refused connection in this process.
        if isinstance(err, RuntimeError) and "DataLoader worker" not in str(err):
            raise
        logger.warning("a DataLoader worker died%s (%s: %s); collating the rest of the epoch in this process (the same "
                       "batches: collation draws no random numbers)", " while stopping" if stopping() else "",
                       type(err).__name__, err)
        for indices in batches[n_done:]:
            yield dataset.batch_sequences([dataset[i] for i in indices])


def worker_deaths_surface_here() -> None:
    """Let a dead DataLoader worker surface where a batch is awaited, not at any line of the step.

    torch installs a SIGCHLD handler that raises "DataLoader worker ... is killed by signal" from
    wherever the main process is when a worker dies: in the middle of a forward pass, where nothing
    can finish the step or write the stop checkpoint (a worker killed together with a SIGTERM ended in
    a traceback). Without it the loader notices a dead worker while waiting for a batch (within
    seconds), which `collated_batches` handles. Uses torch's private flag, checked to exist."""
    from torch.utils.data._utils import signal_handling

    if hasattr(signal_handling, "_SIGCHLD_handler_set"):
        signal_handling._SIGCHLD_handler_set = True  # torch: "already installed", so it installs none
    handler = signal.getsignal(signal.SIGCHLD)
    if callable(handler) and getattr(handler, "__module__", "") == signal_handling.__name__:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # one a loader of this process installed before
