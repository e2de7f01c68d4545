"""LmSeqsDataset (cleaning, base/source pairing, collation) and the grouped batch sampler."""
from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from binarized_io import CorpusWriter, load_corpus
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from lm_seqs_dataset import LmSeqsDataset, collate_sequences, derangement
from utils import CliError

CLS, SEP, PAD, UNK = 101, 102, 0, 100


def seq(content) -> np.ndarray:
    return np.array([CLS, *content, SEP], dtype=np.uint16)


def make(data, **kw) -> LmSeqsDataset:
    args = dict(max_model_input_size=32, cls_id=CLS, sep_id=SEP, pad_id=PAD, unk_id=UNK, seed=0)
    args.update(kw)
    return LmSeqsDataset(data=data, **args)


@pytest.fixture()
def corpus_seqs() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [seq(rng.integers(1000, 2000, size=n)) for n in rng.integers(10, 120, size=60)]


def items(ds) -> list[list[int]]:
    return [ds[i][0].tolist() for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------
# cleaning


def test_long_sequences_are_chunked_rewrapped_and_keep_every_token():
    content = np.arange(1000, 1000 + 200)
    ds = make([seq(content)], max_model_input_size=32, paired=False)
    chunks = items(ds)
    assert len(chunks) == -(-200 // 30)  # as few chunks as fit in 32 tokens with the two specials
    assert all(len(c) <= 32 and c[0] == CLS and c[-1] == SEP for c in chunks)
    assert [t for c in chunks for t in c[1:-1]] == content.tolist()
    assert ds.lengths.tolist() == [len(c) for c in chunks]


def test_short_and_unknown_heavy_sequences_are_dropped():
    data = [
        seq(range(1000, 1009)),  # 11 tokens: dropped
        seq(range(1000, 1010)),  # 12 tokens: kept
        seq([UNK] * 7 + list(range(1000, 1007))),  # 7 unk of 16: kept
        seq([UNK] * 8 + list(range(1000, 1006))),  # 8 unk of 16 (half): dropped
        seq([UNK] * 20),  # all unk: dropped
    ]
    ds = make(data, paired=False)
    assert items(ds) == [data[1].tolist(), data[2].tolist()]
    assert ds.lengths.tolist() == [12, 16]
    # An unk-heavy tail chunk is judged on its own.
    long = seq(list(range(1000, 1030)) + [UNK] * 30)
    assert items(make([long], paired=False)) == [[CLS, *range(1000, 1030), SEP]]
    # unk_id=None turns the unk rule off; min_length is adjustable.
    assert len(make(data, paired=False, unk_id=None)) == 4
    assert len(make(data, paired=False, min_length=0)) == 3


def test_data_fraction_keeps_the_same_whole_sequences_for_every_seed(corpus_seqs):
    """--data_fraction keeps a share of the corpus's sequences, all chunks of each, drawn independently of --seed."""
    full = make(corpus_seqs, paired=False)
    tenth = [make(corpus_seqs, paired=False, seed=s, fraction=0.1) for s in (0, 1)]
    assert items(tenth[0]) == items(tenth[1])
    kept = set(tenth[0].seq_index.tolist())
    assert len(kept) == 6  # a tenth of the 60 sequences
    # every chunk of a kept sequence, and nothing else: the full dataset's items of those sequences, in order
    assert items(tenth[0]) == [it for it, i in zip(items(full), full.seq_index.tolist()) if i in kept]
    assert len(make(corpus_seqs, paired=False, fraction=0.5).seq_index) > len(tenth[0].seq_index)
    assert items(make(corpus_seqs, paired=False, fraction=1.0)) == items(full)
    with pytest.raises(ValueError, match="fraction must lie in"):
        make(corpus_seqs, fraction=0.0)


def test_memory_mapped_and_list_data_clean_the_same(tmp_path, corpus_seqs):
    path = tmp_path / "c.bin"
    with CorpusWriter(path, vocab_size=30522, shuffle=False) as writer:
        for s in corpus_seqs:
            writer.add(s)
    from_list, from_file = make(corpus_seqs), make(str(path))
    from_corpus = make(load_corpus(path))
    assert items(from_list) == items(from_file) == items(from_corpus)
    assert np.array_equal(from_list.lengths, from_file.lengths)
    assert np.array_equal(from_list.pairing, from_file.pairing)
    assert all(len(c) <= 32 for c in items(from_file))


def test_sequences_without_cls_and_sep_are_refused():
    with pytest.raises(CliError, match="#1"):
        make([seq(range(1000, 1020)), np.arange(1000, 1020)])


# ---------------------------------------------------------------------------------------------
# pairing


def test_pairing_is_a_seeded_derangement_redrawn_per_epoch(corpus_seqs):
    for n in (2, 3, 5, 50):
        for seed in range(5):
            p = derangement(n, seed, 0)
            assert sorted(p.tolist()) == list(range(n)) and not np.any(p == np.arange(n))
    ds = make(corpus_seqs)
    again = make(corpus_seqs)
    first = ds.pairing.copy()
    assert np.array_equal(first, again.pairing)  # same seed and epoch: same pairs (every rank agrees)
    assert not np.array_equal(first, make(corpus_seqs, seed=1).pairing)
    ds.set_epoch(1)
    assert not np.array_equal(ds.pairing, first) and not np.any(ds.pairing == np.arange(len(ds)))
    again.set_epoch(1)
    assert np.array_equal(ds.pairing, again.pairing)
    ds.set_epoch(0)
    assert np.array_equal(ds.pairing, first)
    for i in range(len(ds)):
        base, source = ds[i]
        assert base.tolist() == ds.item_ids(i).tolist()
        assert source.tolist() == ds.item_ids(int(ds.pairing[i])).tolist()


def test_pairing_needs_two_sequences():
    with pytest.raises(CliError, match="at least 2"):
        make([seq(range(1000, 1020))])
    assert len(make([seq(range(1000, 1020))], paired=False)) == 1


# ---------------------------------------------------------------------------------------------
# collation


def test_collation_pads_and_fits_the_source_to_the_base_length():
    base = [seq(range(1000, 1010)), seq(range(1000, 1003))]  # lengths 12, 5
    source = [seq(range(2000, 2003)), seq(range(2000, 2020))]  # lengths 5, 22: padded, cut to 12
    out = collate_sequences(list(zip(base, source)), pad_id=7)
    assert set(out) == {"base_ids", "base_lengths", "source_ids", "source_lengths"}
    assert all(t.dtype == torch.int64 for t in out.values())
    assert out["base_ids"].shape == out["source_ids"].shape == (2, 12)
    assert out["base_lengths"].tolist() == [12, 5] and out["source_lengths"].tolist() == [5, 12]
    assert out["base_ids"][1].tolist() == base[1].tolist() + [7] * 7
    assert out["source_ids"][0].tolist() == source[0].tolist() + [7] * 7
    assert out["source_ids"][1].tolist() == source[1][:12].tolist()
    unpaired = collate_sequences([(b,) for b in base], pad_id=7)
    assert set(unpaired) == {"base_ids", "base_lengths"} and unpaired["base_ids"].shape == (2, 12)


def test_collate_fn_in_worker_processes(tmp_path, corpus_seqs):
    path = tmp_path / "c.bin"
    with CorpusWriter(path, vocab_size=30522, seed=0) as writer:
        for s in corpus_seqs:
            writer.add(s)
    ds = make(str(path))
    clone = pickle.loads(pickle.dumps(ds.batch_sequences))  # what a spawned worker receives
    batch = [ds[i] for i in range(5)]
    expected = ds.batch_sequences(batch)
    got = clone(batch)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    loader = DataLoader(ds, batch_size=8, collate_fn=ds.batch_sequences, num_workers=2)
    seen = [b["base_lengths"] for b in loader]
    assert torch.cat(seen).tolist() == ds.lengths.tolist()


# ---------------------------------------------------------------------------------------------
# grouped batch sampler


def test_create_lengths_groups_bins():
    assert create_lengths_groups([2, 3, 6, 7, 10, 11, 500], k=12).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert create_lengths_groups([9, 10, 300], k=0).tolist() == [0, 1, 1]


def _check_batches(batches, indices, groups, batch_size):
    assert Counter(i for b in batches for i in b) == Counter(indices)  # every index exactly once
    assert all(0 < len(b) <= batch_size for b in batches)
    per_group = Counter(int(groups[i]) for i in indices)
    n_leftover = sum(c % batch_size for c in per_group.values())
    n_tail = -(-n_leftover // batch_size)
    head, tail = batches[: len(batches) - n_tail], batches[len(batches) - n_tail :]
    assert all(len(b) == batch_size and len({int(groups[i]) for i in b}) == 1 for b in head)
    tail_groups = [int(groups[i]) for b in tail for i in b]
    assert tail_groups == sorted(tail_groups)  # leftovers come last, ordered by group


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_grouped_batches_on_a_random_sampler(batch_size):
    rng = np.random.default_rng(batch_size)
    lengths = rng.integers(12, 128, size=203)
    groups = create_lengths_groups(lengths, k=128)
    sampler = RandomSampler(range(len(lengths)), generator=torch.Generator().manual_seed(0))
    batch_sampler = GroupedBatchSampler(sampler, groups, batch_size)
    batches = list(batch_sampler)
    assert len(batches) == len(batch_sampler) == -(-203 // batch_size)
    _check_batches(batches, list(range(203)), groups, batch_size)


def test_grouped_batches_on_a_distributed_sampler():
    lengths = np.random.default_rng(0).integers(12, 128, size=101)
    groups = create_lengths_groups(lengths, k=128)
    covered = set()
    for rank in range(2):
        sampler = DistributedSampler(range(101), num_replicas=2, rank=rank, shuffle=True, seed=3)
        batch_sampler = GroupedBatchSampler(sampler, groups, 4)
        batch_sampler.set_epoch(2)
        batches = list(batch_sampler)
        assert len(batches) == len(batch_sampler)
        _check_batches(batches, list(sampler), groups, 4)
        covered.update(i for b in batches for i in b)
    assert covered == set(range(101))
