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
