"""Interventions change exactly the sites they should, read and write the same site, and the
shared-prefix path equals the plain three-run path."""
import pytest
import torch
from helpers import tiny_bert, tiny_distilbert, tiny_gpt2

from interventions import family_of, interchange, lm_logits, run_model

MODELS = {"bert": tiny_bert, "distilbert": tiny_distilbert, "gpt2": tiny_gpt2}


def _inputs(bsz=3, width=10, vocab=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (bsz, width), generator=g)
    lengths = torch.tensor([width, width - 3, width - 5])[:bsz]
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    return ids, mask


def _all_block_outputs(model, ids, mask):
    n = model.config.num_hidden_layers
    _, cap = run_model(model, ids, mask, capture=tuple(range(n)))
    return cap


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_plain_run_matches_stock_forward(kind):
    model = MODELS[kind]()
    ids, mask = _inputs()
    last, _ = run_model(model, ids, mask)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(lm_logits(model, last), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_capture_reads_block_output_not_input(kind):
    """Site l is the output of block l: hidden_states[l + 1] in HF's numbering, not hidden_states[l]."""
    model = MODELS[kind]()
    ids, mask = _inputs()
    cap = _all_block_outputs(model, ids, mask)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    n = model.config.num_hidden_layers
    for layer in range(n - 1):  # GPT-2's last entry has ln_f applied
        torch.testing.assert_close(cap[layer], hs[layer + 1])
        assert not torch.allclose(cap[layer], hs[layer])


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_source_equal_base_gives_plain_output(kind):
    model = MODELS[kind]()
    ids, mask = _inputs()
    layer = 1
    dims = torch.arange(0, 32)
    _, src = run_model(model, ids, mask, capture=(layer,))
    bi = torch.tensor([0, 0, 1, 2])
    pos = torch.tensor([1, 4, 2, 3])
    write = {layer: lambda h: interchange(h, src[layer], dims, bi, pos, pos)}
    cf, _ = run_model(model, ids, mask, writes=write)
    plain, _ = run_model(model, ids, mask)
    torch.testing.assert_close(cf, plain)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_full_write_makes_block_output_equal_source(kind):
    model = MODELS[kind]()
    base_ids, mask = _inputs(seed=0)
    src_ids, _ = _inputs(seed=1)
    width = base_ids.shape[1]
    layer = 0
    _, src = run_model(model, src_ids, mask, capture=(layer,))
    bi = torch.arange(3).repeat_interleave(width)
    pos = torch.arange(width).repeat(3)
    dims = torch.arange(32)
    write = {layer: lambda h: interchange(h, src[layer], dims, bi, pos, pos)}
    _, cap = run_model(model, base_ids, mask, writes=write, capture=(layer, layer + 1))
    torch.testing.assert_close(cap[layer], src[layer])
    # and everything above is then what the source run computes
    _, src_next = run_model(model, src_ids, mask, capture=(layer + 1,))
    torch.testing.assert_close(cap[layer + 1], src_next[layer + 1], atol=1e-5, rtol=1e-5)


def test_write_changes_only_named_dims_and_positions():
    model = tiny_bert()
    base_ids, mask = _inputs(seed=0)
    src_ids, _ = _inputs(seed=1)
    layer = 2
    _, src = run_model(model, src_ids, mask, capture=(layer,))
    _, base = run_model(model, base_ids, mask, capture=(layer,))
    dims = torch.tensor([3, 4, 5, 17])
    bi, bp, sp = torch.tensor([0, 1]), torch.tensor([2, 5]), torch.tensor([7, 1])
    _, cap = run_model(model, base_ids, mask, capture=(layer,),
                       writes={layer: lambda h: interchange(h, src[layer], dims, bi, bp, sp)})
    got, want = cap[layer], base[layer].clone()
    for b, p, s in zip(bi.tolist(), bp.tolist(), sp.tolist()):
        want[b, p, dims] = src[layer][b, s, dims]  # what is written is what was read at the same site
    torch.testing.assert_close(got, want)
    changed = (got != base[layer]).nonzero().tolist()
    allowed = {(b, p, d) for b, p in zip(bi.tolist(), bp.tolist()) for d in dims.tolist()}
    assert changed and {tuple(c) for c in changed} <= allowed


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_stop_after_and_start_after_slices(kind):
    model = MODELS[kind]()
    ids, mask = _inputs()
    n = model.config.num_hidden_layers
    cap = _all_block_outputs(model, ids, mask)
    last_none, part = run_model(model, ids, mask, capture=(0,), stop_after=0)
    assert last_none is None if n > 1 else True
    torch.testing.assert_close(part[0], cap[0])
    full, _ = run_model(model, ids, mask)
    resumed, _ = run_model(model, ids, mask, start_after=(0, cap[0]))
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=1e-5)
    # blocks are restored after slicing
    fam = family_of(model)
    assert len(eval(f"model.{fam.backbone}.{fam.blocks}")) == n


def test_interchange_gradients_reach_both_runs():
    base = torch.randn(2, 4, 6, requires_grad=True)
    src = torch.randn(2, 4, 6, requires_grad=True)
    out = interchange(base, src, torch.tensor([1, 2]), torch.tensor([0]), torch.tensor([3]), torch.tensor([0]))
    out.sum().backward()
    assert base.grad[0, 3, 1] == 0 and base.grad[0, 3, 0] == 1 and base.grad[1].eq(1).all()
    assert src.grad[0, 0, 1] == 1 and src.grad.sum() == 2
