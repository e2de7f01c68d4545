"""The shared-prefix DIITO path computes the same losses and gradients as the plain three-run path."""
import pytest
import torch
from helpers import tiny_bert, tiny_distilbert

from batching import BatchPreparer, length_mask
from causal_distiller import _usable_outside_inference, compute_losses, model_outputs, needs_from_alphas

VOCAB = 120


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([16, 11, 14, 9])
    source_lengths = torch.tensor([12, 16, 7, 13])
    ids = torch.randint(5, VOCAB, (4, 16), generator=g)
    src = torch.randint(5, VOCAB, (4, 16), generator=g)
    ids[~length_mask(lengths, 16)] = 0
    src[~length_mask(source_lengths, 16)] = 0
    return {"base_ids": ids, "base_lengths": lengths, "source_ids": src, "source_lengths": source_lengths}


def _losses_and_grads(shared_prefix, sites_t, sites_s, alphas, mode="random"):
    torch.manual_seed(0)
    probs = torch.ones(VOCAB)
    probs[:5] = 0
    prep = BatchPreparer(mlm=True, vocab_size=VOCAB, mask_id=4, token_probs=probs, interchange_prop=0.4,
                         interchange_mode=mode)
    p = prep.prepare(_batch(), causal=True)
    teacher, student = tiny_bert(n_layers=4), tiny_distilbert(n_layers=3)
    teacher.requires_grad_(False)
    student.train()  # dropout is 0 in the tiny configs
    needs = needs_from_alphas(alphas)
    with torch.inference_mode():
        t = model_outputs(teacher, p, sites_t, needs, want_logits=True, shared_prefix=shared_prefix)
    t = _usable_outside_inference(t)
    s = model_outputs(student, p, sites_s, needs, want_logits=True, shared_prefix=shared_prefix)
    losses, total = compute_losses(s, t, p, alphas, temperature=2.0)
    total.backward()
    grads = {n: q.grad.clone() for n, q in student.named_parameters() if q.grad is not None}
    return {k: v.detach() for k, v in losses.items()}, grads, s.forwards


ALPHAS = {"ce": 0.25, "mlm": 0.25, "clm": 0.0, "mse": 0.0, "cos": 0.25, "causal_ce": 0.25, "causal_cos": 0.25}


@pytest.mark.parametrize("sites", [
    ({2: torch.arange(0, 16)}, {1: torch.arange(0, 16)}),
    ({1: torch.arange(8, 24), 3: torch.arange(0, 32)}, {0: torch.arange(0, 8), 2: torch.arange(4, 12)}),
])
@pytest.mark.parametrize("mode", ["random", "consecutive"])
@pytest.mark.parametrize("mse", [0.0, 0.1], ids=["fused-head", "logits"])
def test_shared_prefix_equals_plain_path(sites, mode, mse):
    alphas = dict(ALPHAS, mse=mse)
    plain_l, plain_g, plain_f = _losses_and_grads(False, *sites, alphas, mode)
    fast_l, fast_g, fast_f = _losses_and_grads(True, *sites, alphas, mode)
    assert plain_f == fast_f == {"base": 1, "source": 1, "counterfactual": 1}
    assert plain_l.keys() == fast_l.keys() == {k for k, v in alphas.items() if v > 0}
    for k in plain_l:
        torch.testing.assert_close(fast_l[k], plain_l[k], atol=1e-5, rtol=1e-5)
    assert plain_g.keys() == fast_g.keys()
    for k in plain_g:
        torch.testing.assert_close(fast_g[k], plain_g[k], atol=1e-5, rtol=1e-4)
    # the intervention matters: counterfactual losses differ from the base ones
    assert not torch.allclose(fast_l["causal_ce"], fast_l["ce"])


def test_no_causal_runs_without_causal_weights():
    alphas = dict(ALPHAS, causal_ce=0.0, causal_cos=0.0)
    _, _, forwards = _losses_and_grads(True, {2: torch.arange(4)}, {1: torch.arange(4)}, alphas)
    assert forwards == {"base": 1}


def test_fused_head_losses_equal_the_logits_path():
    """The same step through head_losses (no logits kept) and through materialised logits."""
    sites = ({2: torch.arange(0, 16)}, {1: torch.arange(0, 16)})
    tiny_mse = dict(ALPHAS, mse=1e-12)  # forces the logits path; its own contribution is negligible
    fused_l, fused_g, _ = _losses_and_grads(True, *sites, dict(ALPHAS, mse=0.0))
    plain_l, plain_g, _ = _losses_and_grads(True, *sites, tiny_mse)
    for k in fused_l:
        torch.testing.assert_close(fused_l[k], plain_l[k], atol=1e-5, rtol=1e-5)
    for k in fused_g:
        torch.testing.assert_close(fused_g[k], plain_g[k], atol=1e-5, rtol=1e-4)
