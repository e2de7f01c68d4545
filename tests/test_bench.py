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


def test_precision_and_batch_reach_the_training_step():
    """--dtypes fp16 trains with the grad scaler's flag (--fp16), --batch_size replaces the preset's batch, and
    both travel to the child process that runs the step."""
    from argparse import Namespace

    bench = load_bench()
    args = Namespace(preset="base", batch_size=None, mode="kd", dtype="fp16", compile=False, pad_to_multiple_of=None,
                     tmp="/tmp/x", data_file=None)
    cfg = bench_setup.preset_of(args)
    assert cfg["batch"] == bench_setup.PRESETS["base"]["batch"]
    params = bench_setup.train_args(args, cfg, mlm=True)
    assert params.fp16 and not params.bf16
    args.batch_size, args.dtype = 160, "bf16"
    params = bench_setup.train_args(args, bench_setup.preset_of(args), mlm=True)
    assert params.batch_size == 160 and params.bf16 and not params.fp16
    parent = bench.build_parser().parse_args(["--preset", "base", "--batch_size", "160"])
    child = bench.child_command(parent, "kd", "fp16")
    assert child[child.index("--batch_size") + 1] == "160" and child[child.index("--dtype") + 1] == "fp16"


@pytest.mark.parametrize("dtypes", ["fp16", "bf16,fp8"])
def test_an_unusable_precision_is_a_clear_error(dtypes, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench_train_step.py", "--dtypes", dtypes])
    with pytest.raises(SystemExit, match="the precisions are fp32, bf16 and fp16, and fp16 needs --device cuda"):
        load_bench().main()
