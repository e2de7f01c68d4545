"""Each loss equals its formula on hand-made tensors."""
import math

import pytest

import torch

from losses import hidden_cosine, lm_cross_entropy, logits_mse, soft_target_kl


def test_soft_target_kl_formula():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[0.5, 0.0, 2.0], [1.0, 1.0, 1.0]])
    T = 2.0
    total = 0.0
    for i in range(2):
        ps = [math.exp(x / T) for x in s[i].tolist()]
        pt = [math.exp(x / T) for x in t[i].tolist()]
        ps = [x / sum(ps) for x in ps]
        pt = [x / sum(pt) for x in pt]
        total += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    want = total / 2 * T * T
    assert math.isclose(soft_target_kl(s, t, T).item(), want, rel_tol=1e-6)
    assert soft_target_kl(t, t, T).abs().item() < 1e-6


def test_lm_cross_entropy_formula():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    targets = torch.tensor([0, 2])
    want = 0.0
    for row, y in zip(logits.tolist(), targets.tolist()):
        want += -(row[y] - math.log(sum(math.exp(x) for x in row)))
    assert math.isclose(lm_cross_entropy(logits, targets).item(), want / 2, rel_tol=1e-6)
    assert lm_cross_entropy(logits[:0], targets[:0]).item() == 0.0


def test_logits_mse_formula():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    t = torch.tensor([[0.0, 2.0], [1.0, 4.0], [1.0, 1.0]])
    assert math.isclose(logits_mse(s, t).item(), (1 + 4 + 1 + 1) / 3, rel_tol=1e-6)


def test_hidden_cosine_formula():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    assert math.isclose(hidden_cosine(s, t).item(), ((1 - 0) + (1 - 1)) / 2, abs_tol=1e-6)


def test_mse_and_cosine_keep_float64_inputs_in_float64():
    """fp64 references must match to round-off: a cast to fp32 inside the loss would lose ~1e-8 relative."""
    torch.manual_seed(0)
    s, t = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    mse, cos = logits_mse(s, t), hidden_cosine(s, t)
    assert mse.dtype == cos.dtype == torch.float64
    want_mse = sum((a - b) ** 2 for ra, rb in zip(s.tolist(), t.tolist()) for a, b in zip(ra, rb)) / 5
    want_cos = sum(1 - sum(a * b for a, b in zip(ra, rb)) / math.sqrt(sum(a * a for a in ra) * sum(b * b for b in rb))
                   for ra, rb in zip(s.tolist(), t.tolist())) / 5
    assert math.isclose(mse.item(), want_mse, rel_tol=1e-14) and math.isclose(cos.item(), want_cos, rel_tol=1e-13)
    assert logits_mse(s.bfloat16(), t.bfloat16()).dtype == torch.float32  # low precision accumulates in fp32


def test_soft_target_kl_gradient_matches_autograd_reference():
    import losses

    torch.manual_seed(0)
    s = torch.randn(1100, 37, requires_grad=True)  # more rows than one chunk
    t = torch.randn(1100, 37)
    T = 1.5
    soft_target_kl(s, t, T).backward()
    got = s.grad.clone()
    s.grad = None
    ref = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                     reduction="sum", log_target=True) / 1100 * T * T
    ref.backward()
    assert losses.CHUNK_ROWS["cpu"] < 1100
    torch.testing.assert_close(got, s.grad, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(soft_target_kl(s, t, T), ref.detach(), atol=1e-6, rtol=1e-6)


def test_head_losses_equal_the_plain_losses_on_materialised_logits():
    import losses
    from losses import head_losses

    torch.manual_seed(0)
    n, h, v = 1100, 16, 300  # more rows than one CPU chunk
    proj = torch.nn.Linear(h, v)
    t_proj = torch.nn.Linear(h, v)
    s_feat = torch.randn(n, h, requires_grad=True)
    t_feat = torch.randn(n, h)
    labels = torch.full((n,), -1)
    rows = torch.randperm(n)[:700].sort().values  # more labelled rows than one CPU chunk too
    labels[rows] = torch.randint(0, v, (700,))
    T, a_kl, a_lm = 2.0, 0.3, 0.7
    total, kl, lm = head_losses(s_feat, proj, t_feat, t_proj, rows, labels[rows], T, a_kl, a_lm)
    total.backward()
    got = (s_feat.grad.clone(), proj.weight.grad.clone(), proj.bias.grad.clone())
    for p in (s_feat, proj.weight, proj.bias):
        p.grad = None

    logits = proj(s_feat)
    with torch.no_grad():
        t_logits = t_proj(t_feat)
    ref_kl = torch.nn.functional.kl_div(torch.log_softmax(logits / T, -1), torch.log_softmax(t_logits / T, -1),
                                        reduction="sum", log_target=True) / n * T * T
    ref_lm = torch.nn.functional.cross_entropy(logits[labels >= 0], labels[labels >= 0])
    (a_kl * ref_kl + a_lm * ref_lm).backward()
    assert losses.CHUNK_ROWS["cpu"] < n
    torch.testing.assert_close(kl, ref_kl.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lm, ref_lm.detach(), atol=1e-5, rtol=1e-5)
    for g, p in zip(got, (s_feat, proj.weight, proj.bias)):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def test_compiled_kl_kernel_equals_the_eager_one():
    import shutil

    import pytest

    import losses
    from helpers import head_losses_eager_and_compiled

    if not any(shutil.which(c) for c in ("c++", "g++", "gcc", "clang++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler")
    torch.manual_seed(0)
    n, h, v = 600, 8, 97  # more rows than one CPU chunk, and a last chunk of another size
    proj, t_proj = torch.nn.Linear(h, v), torch.nn.Linear(h, v)
    s_feat = torch.randn(n, h, requires_grad=True)
    t_feat = torch.randn(n, h)
    rows = torch.arange(0, n, 7)
    targets = torch.randint(0, v, rows.shape)

    eager, compiled = head_losses_eager_and_compiled(s_feat, proj, t_feat, t_proj, rows, targets)
    assert losses._compiled_kl is None
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_head_losses_with_the_vocabulary_padded_are_unchanged(monkeypatch, with_bias, temperature):
    """The CUDA alignment (`losses.HEAD_ALIGN`), switched on for the CPU: a 300-entry vocabulary padded
    to 320 gives the same losses and gradients as the plain computation."""
    import losses
    from losses import head_losses

    torch.manual_seed(0)
    n, h, v = 600, 16, 300
    proj, t_proj = torch.nn.Linear(h, v, bias=with_bias), torch.nn.Linear(h, v, bias=with_bias)
    s_feat = torch.randn(n, h, requires_grad=True)
    t_feat = torch.randn(n, h)
    rows = torch.arange(0, n, 5)
    targets = torch.randint(0, v, rows.shape)

    def run():
        for p in (s_feat, *proj.parameters()):
            p.grad = None
        total, kl, lm = head_losses(s_feat, proj, t_feat, t_proj, rows, targets, temperature, 0.4, 0.6)
        total.backward()
        return [total.detach(), kl, lm, s_feat.grad.clone()] + [p.grad.clone() for p in proj.parameters()]

    plain = run()
    monkeypatch.setitem(losses.HEAD_ALIGN, "cpu", 64)
    padded = run()
    assert all(p.grad.shape == p.shape for p in proj.parameters())
    for a, b in zip(padded, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# --- divergences of the soft-target terms ----------------------------------------------------------------------
def reference_divergence(s, t, T, name, beta=0.5, skew=0.0):
    """T² / N * sum over rows of the divergence of softmax(s / T) from softmax(t / T), written as plainly as
    possible in float64 (autograd gives its gradient)."""
    p_s, p_t = torch.softmax(s / T, -1), torch.softmax(t / T, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum()

    if name == "forward_kl":
        value = kl(p_t, skew * p_t + (1 - skew) * p_s)
    elif name == "reverse_kl":
        value = kl(p_s, skew * p_s + (1 - skew) * p_t)
    elif name == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        value = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    else:
        value = 0.5 * (p_s - p_t).abs().sum()
    return value * T * T / s.shape[0]


DIVERGENCE_CASES = [("forward_kl", 0.5, 0.0), ("forward_kl", 0.5, 0.1), ("reverse_kl", 0.5, 0.0),
                    ("reverse_kl", 0.5, 0.3), ("jsd", 0.5, 0.0), ("jsd", 0.1, 0.0), ("jsd", 0.9, 0.0),
                    ("tvd", 0.5, 0.0)]


@pytest.mark.parametrize("name, beta, skew", DIVERGENCE_CASES)
def test_every_divergence_equals_its_formula_in_float64_values_and_gradients(name, beta, skew):
    from losses import Divergence, head_losses, soft_target_loss

    torch.manual_seed(0)
    T = 1.7
    s = torch.randn(300, 41, dtype=torch.float64, requires_grad=True)  # more rows than one CPU chunk (256)
    t = torch.randn(300, 41, dtype=torch.float64)
    want = reference_divergence(s, t, T, name, beta, skew)
    (want_grad,) = torch.autograd.grad(want, s)
    divergence = Divergence(name, beta=beta, skew=skew)
    got = soft_target_loss(s, t, T, divergence)
    (got_grad,) = torch.autograd.grad(got, s)
    assert got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    assert torch.allclose(got_grad, want_grad, rtol=1e-10, atol=1e-14)
    # the chunked head computes the same from features and the LM head
    head = torch.nn.Linear(16, 41, dtype=torch.float64)
    t_head = torch.nn.Linear(16, 41, dtype=torch.float64)
    feat = torch.randn(300, 16, dtype=torch.float64, requires_grad=True)
    t_feat = torch.randn(300, 16, dtype=torch.float64)
    want = reference_divergence(head(feat), t_head(t_feat), T, name, beta, skew) * 0.7
    want_grads = torch.autograd.grad(want, (feat, head.weight, head.bias))
    total, value, _ = head_losses(feat, head, t_feat, t_head, None, None, T, 0.7, 0.0, divergence)
    got_grads = torch.autograd.grad(total, (feat, head.weight, head.bias))
    assert torch.allclose(total, want, rtol=1e-12) and torch.allclose(value * 0.7, want, rtol=1e-12)
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-13)


def test_jsd_beta_0_and_1_are_the_kls_and_skew_0_is_the_plain_kl():
    from losses import FORWARD_KL, Divergence, soft_target_loss

    torch.manual_seed(1)
    s, t = torch.randn(20, 9, dtype=torch.float64), torch.randn(20, 9, dtype=torch.float64)
    forward = soft_target_loss(s, t, 2.0, FORWARD_KL)
    reverse = soft_target_loss(s, t, 2.0, Divergence("reverse_kl"))
    assert torch.equal(soft_target_loss(s, t, 2.0, Divergence("jsd", beta=0.0)), forward)
    assert torch.equal(soft_target_loss(s, t, 2.0, Divergence("jsd", beta=1.0)), reverse)
    assert torch.allclose(reverse, soft_target_loss(t, s, 2.0, FORWARD_KL), rtol=1e-12)  # KL(s||t), the KL reversed
    assert torch.equal(soft_target_loss(s, t, 2.0, Divergence("forward_kl", skew=0.0)), forward)
    half = soft_target_loss(s, t, 1.0, Divergence("jsd", beta=0.5))
    assert torch.allclose(half, soft_target_loss(t, s, 1.0, Divergence("jsd", beta=0.5)), rtol=1e-12)  # symmetric
    assert 0 < half.item() < math.log(2)  # JSD(0.5) is bounded by log 2
    tvd = soft_target_loss(s, t, 1.0, Divergence("tvd"))
    assert 0 < tvd.item() < 1
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd"):  # zero, with a zero gradient, when they agree
        same = s.clone().requires_grad_(True)
        loss = soft_target_loss(same, s, 1.5, Divergence(name))
        loss.backward()
        assert abs(loss.item()) < 1e-15 and same.grad.abs().max().item() < 1e-15


def test_bad_divergence_settings_are_refused():
    from losses import Divergence

    with pytest.raises(ValueError, match="unknown divergence"):
        Divergence("kl")
    with pytest.raises(ValueError, match="beta must lie in"):
        Divergence("jsd", beta=1.5)
    with pytest.raises(ValueError, match="a skew applies to forward_kl and reverse_kl"):
        Divergence("tvd", skew=0.1)
