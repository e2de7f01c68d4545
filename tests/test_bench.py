"""bench/bench_train_step.py's own arithmetic: what it counts must be what the step computes."""
import pytest
import bench_setup
from helpers import load_bench


def test_grouped_query_attention_is_counted_as_the_attention_it_computes(monkeypatch):
    """torch 2.11's FlopCounterMode asserts equal head counts, which CUDA's kernels do not need (a Llama
    with 16 query heads over 8 key/value heads stopped the bench on an H200): the bench counts each
    key/value head once per query head of its group."""
    import torch.utils.flop_counter as fc

    def strict(q, k, v):  # as torch 2.11
        if not q[1] == k[1] == v[1]:
            raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")
        return 4 * q[0] * q[1] * q[2] * k[2] * q[3]

    def strict_backward(g, q, k, v):
        strict(q, k, v)
        return 2 * strict(q, k, v)

    monkeypatch.setattr(fc, "sdpa_flop_count", strict)
    monkeypatch.setattr(fc, "sdpa_backward_flop_count", strict_backward)
    monkeypatch.setattr(fc, "_causal_distill_gqa", False, raising=False)
    query, grouped, full = (2, 16, 512, 64), (2, 8, 512, 64), (2, 16, 512, 64)
    with pytest.raises(AssertionError):
        fc.sdpa_flop_count(query, grouped, grouped)
    load_bench()._count_gqa_attention()
    assert fc.sdpa_flop_count(query, grouped, grouped) == strict(query, full, full)
    assert fc.sdpa_backward_flop_count(query, query, grouped, grouped) == strict_backward(query, query, full, full)
    assert fc.sdpa_flop_count(query, full, full) == strict(query, full, full)
    load_bench()._count_gqa_attention()  # twice: not wrapped twice
    assert fc.sdpa_flop_count(query, grouped, grouped) == strict(query, full, full)


def test_synthetic_sequences_of_a_large_vocabulary_keep_their_ids():
    """Llama 3's 128,256 ids do not fit uint16 (the bench's base_clm preset): they must not wrap."""
    import numpy as np

    seqs = bench_setup.synthetic_sequences(50, 128256, 0, 1, 2, length=64)
    assert all(len(s) == 64 and s.dtype == np.int32 for s in seqs)
    assert max(int(s.max()) for s in seqs) > 65535
    small = bench_setup.synthetic_sequences(50, 30522, 0)
    assert all(s.dtype == np.uint16 and 12 <= len(s) <= 466 for s in small)
