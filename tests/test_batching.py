"""Batch preparation: MLM masking rules, CLM targets, interchange positions."""
import math

import torch

from batching import BatchPreparer, length_mask

VOCAB = 50
SPECIAL = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask


def _batch(lengths, width=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    width = width or int(lengths.max())
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=g)
    ids[:, 0] = 2
    ids[torch.arange(len(lengths)), lengths - 1] = 3
    ids[~length_mask(lengths, width)] = 0
    return ids, lengths


def _preparer(**kw):
    probs = torch.ones(VOCAB)
    probs[SPECIAL] = 0
    return BatchPreparer(mlm=True, vocab_size=VOCAB, mask_id=4, token_probs=probs, **kw)


def _paired(base_lengths, source_lengths):
    b, bl = _batch(base_lengths, seed=0)
    width = b.shape[1]
    s, sl = _batch(source_lengths, width=max(width, max(source_lengths)), seed=1)
    return {"base_ids": b, "base_lengths": bl, "source_ids": s[:, :width], "source_lengths": sl.clamp(max=width)}


def test_mlm_masking_counts_and_never_special_or_padding():
    torch.manual_seed(0)
    ids, lengths = _batch([20, 12, 7], width=20)
    prep = _preparer(mlm_mask_prop=0.5)
    out = prep.prepare({"base_ids": ids, "base_lengths": lengths}, causal=False)
    chosen = out.mlm_mask
    assert int(chosen.sum()) == math.ceil(0.5 * int(lengths.sum()))  # ceil(prop * real tokens)
    assert not chosen[~length_mask(lengths, 20)].any()
    assert not chosen[ids == 2].any() and not chosen[ids == 3].any()
    # unchosen tokens are untouched; targets are the original ids of the chosen ones
    assert torch.equal(out.input_ids[~chosen], ids[~chosen])
    assert torch.equal(out.lm_targets, ids.flatten()[chosen.flatten()])
    # logits rows are every real token; lm_rows point at the chosen ones among them
    real = ids.flatten()[out.logit_idx]
    assert torch.equal(real[out.lm_rows], out.lm_targets)


def test_80_10_10_split():
    torch.manual_seed(0)
    ids, lengths = _batch([400] * 50)
    prep = _preparer(mlm_mask_prop=0.5)
    out = prep.prepare({"base_ids": ids, "base_lengths": lengths}, causal=False)
    chosen = out.mlm_mask
    masked = (out.input_ids[chosen] == 4).float().mean().item()
    kept = (out.input_ids[chosen] == ids[chosen]).float().mean().item()
    assert abs(masked - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / VOCAB)) < 0.02


def test_restrict_ce_to_mask_selects_only_masked_rows():
    torch.manual_seed(0)
    ids, lengths = _batch([15, 12])
    out = _preparer(restrict_ce_to_mask=True).prepare({"base_ids": ids, "base_lengths": lengths}, causal=False)
    assert torch.equal(out.logit_idx, out.mlm_mask.flatten().nonzero().flatten())
    assert torch.equal(out.lm_rows, torch.arange(out.logit_idx.numel()))


def test_clm_targets_are_next_tokens():
    ids, lengths = _batch([6, 4])
    prep = BatchPreparer(mlm=False, vocab_size=VOCAB)
    out = prep.prepare({"base_ids": ids, "base_lengths": lengths}, causal=False)
    width = ids.shape[1]
    flat_rows = out.logit_idx[out.lm_rows]
    assert torch.equal(out.lm_targets, ids.flatten()[flat_rows + 1])
    assert ((flat_rows % width) < (lengths[flat_rows // width] - 1)).all()
    assert out.lm_targets.numel() == int((lengths - 1).sum())


def test_interchange_counts_and_real_tokens_only():
    torch.manual_seed(0)
    prep = _preparer(interchange_prop=0.5)
    batch = _paired([20, 10, 6, 24], [8, 16, 12, 24])
    out = prep.prepare(batch, causal=True)
    want = (torch.minimum(batch["base_lengths"], batch["source_lengths"]).double() * 0.5).long()
    assert torch.equal(torch.bincount(out.batch_idx, minlength=4), want)
    assert (out.base_pos < batch["base_lengths"][out.batch_idx]).all()
    assert (out.source_pos < batch["source_lengths"][out.batch_idx]).all()


def test_interchange_max_token_and_zero_count():
    torch.manual_seed(0)
    batch = _paired([20, 3], [20, 3])
    out = _preparer(interchange_prop=0.3, interchange_max_token=2).prepare(batch, causal=True)
    assert torch.equal(torch.bincount(out.batch_idx, minlength=2), torch.tensor([2, 0]))


def test_consecutive_spans():
    torch.manual_seed(0)
    batch = _paired([20, 15], [12, 18])
    out = _preparer(interchange_prop=0.5, interchange_mode="consecutive").prepare(batch, causal=True)
    for b in range(2):
        for pos in (out.base_pos[out.batch_idx == b], out.source_pos[out.batch_idx == b]):
            assert torch.equal(pos, torch.arange(int(pos[0]), int(pos[0]) + len(pos)))


def test_masked_only_base_positions_are_masked_tokens():
    torch.manual_seed(0)
    batch = _paired([30, 30], [30, 30])
    out = _preparer(interchange_prop=0.5, masked_only=True).prepare(batch, causal=True)
    assert out.mlm_mask[out.batch_idx, out.base_pos].all()
    assert torch.equal(torch.bincount(out.batch_idx, minlength=2), out.mlm_mask.sum(1).clamp(max=15))


def test_reverse_swaps_roles():
    torch.manual_seed(0)
    batch = _paired([10, 12], [14, 8])
    out = BatchPreparer(mlm=False, vocab_size=VOCAB).prepare(batch, causal=True, reverse=True)
    assert torch.equal(out.input_ids, batch["source_ids"]) and torch.equal(out.source_ids, batch["base_ids"])


def test_widening_pads_to_a_multiple_and_keeps_every_selection_on_real_tokens():
    """--pad_to_multiple_of (CUDA's default 64): the batch grows by padding only; nothing selects it."""
    batch = _paired([13, 9, 11], [10, 13, 6])
    assert batch["base_ids"].shape[1] == 13
    for multiple, cap, want in [(8, None, 16), (8, 14, 14), (1, None, 13), (13, None, 13)]:
        for mlm in (True, False):
            prep = _preparer(pad_to_multiple_of=multiple, max_width=cap, interchange_prop=0.5) if mlm else \
                BatchPreparer(mlm=False, vocab_size=VOCAB, pad_to_multiple_of=multiple, max_width=cap, interchange_prop=0.5)
            torch.manual_seed(0)
            p = prep.prepare(batch, causal=True)
            assert p.input_ids.shape[1] == p.source_ids.shape[1] == want
            real = length_mask(batch["base_lengths"], want)
            assert torch.equal(p.attention_mask.bool(), real)
            assert torch.equal(p.source_mask.bool(), length_mask(batch["source_lengths"], want))
            # the real tokens, in order, are the batch's own; selections index only them
            flat = p.input_ids.flatten()
            assert real.flatten()[p.real_idx].all() and real.flatten()[p.logit_idx].all()
            if not mlm:
                assert torch.equal(flat[p.real_idx], batch["base_ids"][length_mask(batch["base_lengths"], 13)])
            assert (p.base_pos < batch["base_lengths"][p.batch_idx]).all()
            assert (p.source_pos < batch["source_lengths"][p.batch_idx]).all()
