"""Issue 21.9: fp64 references, written without the project's hooks, for what the rest of the suite let through.

- `causal_ce` of the real training step at T = 2 equals T² x KL(teacher counterfactual || student
  counterfactual), both counterfactuals computed by running the stock blocks one by one and patching
  the chosen positions and dimensions by hand. It fails if the loss is taken against the teacher's
  base output, or without the T² factor (the only other value check runs with source = base at T = 1).
- effective IIA is hand-counted on a noisy copy of the teacher (where IIA and effective IIA differ):
  it fails if effective IIA is counted over every position instead of the changed ones.
- `losses.head_losses` runs on fp64 models (it mixed fp32 accumulators with fp64 features before).
- the teacher as its own student gets IIA 1 only with a mapping that aligns each site with itself.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import in_memory_distiller, tiny_bert, tiny_distilbert

import causal_distiller
import iia
from batching import BatchPreparer
from lm_seqs_dataset import LmSeqsDataset
from losses import head_losses
from neuron_mapping import MappingEntry

VOCAB, HIDDEN, T = 120, 32, 2.0


# --- hook-free references ----------------------------------------------------------------------------

def _blocks(model):
    return model.bert.encoder.layer if model.config.model_type == "bert" else model.distilbert.transformer.layer


def _embed(model, ids):
    return model.bert.embeddings(input_ids=ids) if model.config.model_type == "bert" else model.distilbert.embeddings(ids)


def _logits(model, hidden):
    """The masked-LM head on final hidden states, written out (BERT's `cls`, DistilBERT's vocab_* layers)."""
    if model.config.model_type == "bert":
        return model.cls(hidden)
    x = model.vocab_layer_norm(model.activation(model.vocab_transform(hidden)))
    return model.vocab_projector(x)


def _run(model, ids, patch=None):
    """Every block's output and the logits of the stock blocks run one by one (no padding: no mask needed).

    patch: (layer, fn) applies fn to that block's output before the next block sees it."""
    h = _embed(model, ids)
    outputs = []
    for i, block in enumerate(_blocks(model)):
        out = block(h)
        h = out[0] if isinstance(out, tuple) else out
        if patch is not None and patch[0] == i:
            h = patch[1](h)
        outputs.append(h)
    return outputs, _logits(model, h)


def _counterfactual(model, p, layer, dims):
    """Logits of the base input with block `layer`'s output at (batch_idx, base_pos, dims) taken from the source
    run's output of the same block at (batch_idx, source_pos, dims)."""
    source_blocks, _ = _run(model, p.source_ids)
    src = source_blocks[layer]
    dims = torch.tensor(dims)

    def swap(h):
        h = h.clone()
        h[p.batch_idx[:, None], p.base_pos[:, None], dims[None, :]] = \
            src[p.batch_idx[:, None], p.source_pos[:, None], dims[None, :]]
        return h

    return _run(model, p.input_ids, (layer, swap))[1]


# --- causal_ce through the real step ---------------------------------------------------------------------

def _distiller(teacher, student, t_sites, s_sites, shared_prefix):
    argv = ["--dump_path", "unused", "--data_file", "unused", "--student_type", "distilbert", "--student_config",
            "unused", "--teacher_type", "bert", "--teacher_name", "unused", "--n_gpu", "0", "--mlm",
            "--alpha_ce", "0.0", "--alpha_mlm", "0.0", "--alpha_clm", "0.0", "--alpha_causal_ce", "1.0",
            "--temperature", str(T), "--interchange_prop", "0.4", "--mlm_mask_prop", "0.3", "--batch_size", "3",
            "--token_counts", "unused"] + ([] if shared_prefix else ["--no_shared_prefix"])
    return in_memory_distiller(argv, teacher, student, t_sites, s_sites, VOCAB)


def _unpadded_batch(seed=0, width=12):
    g = torch.Generator().manual_seed(seed)
    ids, src = (torch.randint(5, VOCAB, (3, width), generator=g) for _ in range(2))
    for t in (ids, src):
        t[:, 0], t[:, -1] = 2, 3
    lengths = torch.full((3,), width)
    return {"base_ids": ids, "base_lengths": lengths, "source_ids": src, "source_lengths": lengths.clone()}


@pytest.mark.parametrize("shared_prefix", [True, False], ids=["shared-prefix", "plain"])
def test_causal_ce_at_t2_equals_the_hook_free_fp64_reference(monkeypatch, shared_prefix):
    teacher, student = tiny_bert(n_layers=4).double(), tiny_distilbert(n_layers=3).double()
    t_layer, t_dims = 1, list(range(4, 28))
    s_layer, s_dims = 1, list(range(0, 20))
    distiller = _distiller(teacher, student, {t_layer: t_dims}, {s_layer: s_dims}, shared_prefix)
    seen = {}
    original = causal_distiller.compute_losses

    def spy(s, t, p, *settings):
        seen["p"] = p
        return original(s, t, p, *settings)

    monkeypatch.setattr(causal_distiller, "compute_losses", spy)
    torch.manual_seed(0)
    values, total = distiller.losses_for_batch(_unpadded_batch())
    total.backward()
    grads = {name: prm.grad.clone() for name, prm in student.named_parameters() if prm.grad is not None}
    student.zero_grad(set_to_none=True)
    p = seen["p"]
    assert p.batch_idx.numel() > 0 and p.attention_mask.all()

    rows = p.logit_idx
    t_cf = _counterfactual(teacher, p, t_layer, t_dims).reshape(-1, VOCAB)[rows]
    s_cf = _counterfactual(student, p, s_layer, s_dims).reshape(-1, VOCAB)[rows]
    t_base = _run(teacher, p.input_ids)[1].reshape(-1, VOCAB)[rows]

    def kl(t_logits, s_logits):  # T² / N * sum KL(softmax(t/T) || softmax(s/T))
        return F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), reduction="sum",
                        log_target=True) / rows.numel() * T * T

    want = kl(t_cf.detach(), s_cf)
    assert values["causal_ce"].dtype == torch.float64
    torch.testing.assert_close(values["causal_ce"], want.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(total.detach(), want.detach(), rtol=1e-10, atol=0)
    want.backward()  # the gradient too (the head losses form it in their forward pass, apart from the value)
    assert grads.keys() == {name for name, prm in student.named_parameters() if prm.grad is not None}
    for name, prm in student.named_parameters():
        if prm.grad is not None:
            torch.testing.assert_close(grads[name], prm.grad, rtol=1e-8, atol=1e-14, msg=name)
    t_cf, t_base, s_cf, want = t_cf.detach(), t_base.detach(), s_cf.detach(), want.detach()
    # what each put-back bug would give instead is far from it:
    assert abs(kl(t_base, s_cf).item() / want.item() - 1) > 1e-4  # the teacher's base output as the target
    assert kl(t_cf, t_base).item() > 1e-5  # (because the intervention does change the teacher's output)


def test_head_losses_on_fp64_equal_the_plain_fp64_losses():
    torch.manual_seed(0)
    n, h, v = 600, 16, 97  # more rows than one CPU chunk
    proj, t_proj = torch.nn.Linear(h, v).double(), torch.nn.Linear(h, v).double()
    s_feat = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    t_feat = torch.randn(n, h, dtype=torch.float64)
    rows = torch.arange(0, n, 3)
    targets = torch.randint(0, v, rows.shape)
    total, kl, lm = head_losses(s_feat, proj, t_feat, t_proj, rows, targets, T, 0.4, 0.6)
    total.backward()
    got = [total.detach(), kl, lm, s_feat.grad.clone(), proj.weight.grad.clone(), proj.bias.grad.clone()]
    for prm in (s_feat, proj.weight, proj.bias):
        prm.grad = None
    logits = proj(s_feat)
    ref_kl = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_proj(t_feat).detach() / T, -1), reduction="sum",
                      log_target=True) / n * T * T
    ref_lm = F.cross_entropy(logits[rows], targets)
    ref = 0.4 * ref_kl + 0.6 * ref_lm
    ref.backward()
    want = [ref.detach(), ref_kl.detach(), ref_lm.detach(), s_feat.grad, proj.weight.grad, proj.bias.grad]
    for a, b in zip(got, want):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


# --- effective IIA, hand-counted ---------------------------------------------------------------------------

def _iia_setup(noise: float, t_dims, s_dims, layer=1, s_layer=1):
    teacher = tiny_bert(n_layers=3).double()
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for prm in student.parameters():
            prm.add_(noise * prm.abs().mean() * torch.randn(prm.shape, generator=g, dtype=prm.dtype))
    rng = np.random.default_rng(1)
    dataset = LmSeqsDataset(data=[np.r_[2, rng.integers(5, VOCAB, 14), 3] for _ in range(40)], max_model_input_size=64,
                            cls_id=2, sep_id=3, pad_id=0, unk_id=1, seed=3, paired=True)
    dataset.set_epoch(0)
    preparer = BatchPreparer(mlm=True, vocab_size=VOCAB, mask_id=4, token_probs=torch.cat([torch.zeros(5),
                             torch.ones(VOCAB - 5)]), mlm_mask_prop=0.5, pred_probs=(0.8, 0.1, 0.1),
                             restrict_ce_to_mask=True, interchange_prop=0.5, interchange_max_token=-1,
                             interchange_mode="random", masked_only=False)
    batches = iia.prepare_batches(dataset, np.arange(len(dataset)), preparer, batch_size=8, seed=5)
    entry = MappingEntry(0, {layer: tuple(t_dims)}, {s_layer: tuple(s_dims)}, ("t",), ("s",))
    return teacher, student, batches, entry


def _hand_count(teacher, student, batches, entry):
    """(positions, hits, changed, hits among the changed) over every batch, from hook-free runs."""
    (t_layer, t_dims), = entry.teacher.items()
    (s_layer, s_dims), = entry.student.items()
    n = hits = changed = changed_hits = 0
    for p in batches:
        assert p.attention_mask.all()
        rows = p.logit_idx
        t_base = _run(teacher, p.input_ids)[1].reshape(-1, VOCAB)[rows].argmax(-1)
        t_cf = _counterfactual(teacher, p, t_layer, list(t_dims)).reshape(-1, VOCAB)[rows].argmax(-1)
        s_cf = _counterfactual(student, p, s_layer, list(s_dims)).reshape(-1, VOCAB)[rows].argmax(-1)
        n += rows.numel()
        hits += int((t_cf == s_cf).sum())
        ch = t_cf != t_base
        changed += int(ch.sum())
        changed_hits += int(((t_cf == s_cf) & ch).sum())
    return n, hits, changed, changed_hits


def test_effective_iia_counts_only_the_changed_positions_of_a_noisy_teacher_copy():
    teacher, student, batches, entry = _iia_setup(0.3, range(HIDDEN), range(HIDDEN))
    summary = iia.summarize(iia.evaluate(teacher, student, batches, [entry]), [entry], n_boot=10)
    n, hits, changed, changed_hits = _hand_count(teacher, student, batches, entry)
    row = summary["entries"][0]
    assert 0 < changed < n and 0 < changed_hits < changed  # IIA and effective IIA are different numbers here
    assert row["positions"] == n and row["changed_positions"] == changed
    assert row["iia"]["value"] == pytest.approx(hits / n, abs=1e-12)
    assert row["effective_iia"]["value"] == pytest.approx(changed_hits / changed, abs=1e-12)
    assert row["changed"]["value"] == pytest.approx(changed / n, abs=1e-12)
    assert abs(changed_hits / changed - hits / n) > 0.02 and abs(changed_hits / changed - changed_hits / n) > 0.02


def test_the_teacher_as_its_own_student_gets_iia_1_only_when_each_site_is_aligned_with_itself():
    same = _iia_setup(0.0, range(8, 24), range(8, 24))
    other = _iia_setup(0.0, range(8, 24), range(0, 16), layer=1, s_layer=0)
    iia_of = {}
    for name, (teacher, student, batches, entry) in (("same", same), ("other", other)):
        summary = iia.summarize(iia.evaluate(teacher, student, batches, [entry]), [entry], n_boot=10)
        iia_of[name] = summary["entries"][0]["iia"]["value"]
        assert summary["base_agreement"]["value"] == 1.0  # the same model: always the same prediction unpatched
    assert iia_of["same"] == 1.0
    assert iia_of["other"] < 0.95
