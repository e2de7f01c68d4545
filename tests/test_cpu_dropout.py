"""The CPU attention with dropout computes softmax(q k^T * scale + mask), dropout, times v, and its gradient."""
import math

import pytest
import torch
from transformers import (
    AutoModelForMaskedLM, BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM, GPT2Config,
    GPT2LMHeadModel,
)

from cpu_dropout import (
    NAME, CpuDropout, DropoutAttention, cpu_dropout_attention_forward, keep_mask, use_cpu_dropout,
    use_cpu_dropout_attention,
)


def reference(q, k, v, mask, keep, p, scale):
    scores = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (torch.softmax(scores, -1) * keep / (1 - p)) @ v


def leaves(*shapes, dtype=torch.float64):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_output_and_gradients_equal_the_formula_with_the_same_keep_mask(mask_kind):
    torch.manual_seed(0)
    b, h, lq, lk, d, p, scale = 2, 3, 5, 7, 4, 0.3, 0.4
    q, k, v = leaves((b, h, lq, d), (b, h, lk, d), (b, h, lk, d))
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(b, 1, lq, lk, dtype=torch.bool)
        mask[1, :, :, 4:] = False  # padded keys of the second sequence
    elif mask_kind == "float":
        mask = torch.randn(b, 1, lq, lk, dtype=torch.float64)
    grad = torch.randn(b, h, lq, d, dtype=torch.float64)

    torch.manual_seed(1)
    out = DropoutAttention.apply(q, k, v, mask, p, scale)
    (out * grad).sum().backward()
    got = [out.detach(), q.grad, k.grad, v.grad]
    for x in (q, k, v):
        x.grad = None
    torch.manual_seed(1)
    keep = keep_mask((b, h, lq, lk), p)
    assert 0 < keep.sum() < keep.numel()  # some dropped, some kept: the mask matters
    want = reference(q, k, v, mask, keep, p, scale)
    (want * grad).sum().backward()
    for a, e in zip(got, [want.detach(), q.grad, k.grad, v.grad]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    if mask_kind == "bool":  # a padded key gets no attention: its value has no gradient
        assert v.grad[1, :, 4:].abs().max() == 0


def test_causal_modules_mask_the_future():
    module = torch.nn.Module()
    module.is_causal = True
    torch.manual_seed(0)
    q, k, v = leaves((1, 2, 6, 4), (1, 2, 6, 4), (1, 2, 6, 4))
    torch.manual_seed(3)
    out, _ = cpu_dropout_attention_forward(module, q, k, v, None, dropout=0.2)
    torch.manual_seed(3)
    keep = keep_mask((1, 2, 6, 6), 0.2)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    want = reference(q, k, v, causal, keep, 0.2, 0.5).transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_keep_mask_rate_on_every_lane():
    torch.manual_seed(0)
    keep = keep_mask((250_000, 4), 0.1).double()
    assert keep.dtype == torch.float64 and keep.shape == (250_000, 4)
    for lane in range(4):  # the four 16-bit lanes of each random word are all uniform
        assert abs(keep[:, lane].mean().item() - 0.9) < 0.003
    assert keep_mask((3, 5), 0.0).all() and not keep_mask((3, 5), 1.0).any()


def test_without_dropout_it_is_the_stock_sdpa():
    module = torch.nn.Module()  # in training mode; transformers passes dropout=0 in eval mode
    module.is_causal = False
    q, k, v = (torch.randn(2, 2, 5, 4) for _ in range(3))
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[0, :, :, 3:] = False
    out, _ = cpu_dropout_attention_forward(module, q, k, v, mask, dropout=0.0)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    assert torch.equal(out, want)


def _models():
    return {
        "bert": BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                           intermediate_size=32, max_position_embeddings=16)),
        "distilbert": DistilBertForMaskedLM(DistilBertConfig(vocab_size=60, dim=16, n_layers=2, n_heads=2,
                                                             hidden_dim=32, max_position_embeddings=16)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=60, n_embd=16, n_layer=2, n_head=2, n_positions=16,
                                           bos_token_id=0, eos_token_id=0)),
    }


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2"])
def test_stock_models_use_it_honour_padding_and_save_without_it(family, tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _models()[family]
    stock_eval = None
    ids = torch.randint(5, 60, (2, 8))
    attention = torch.ones(2, 8, dtype=torch.long)
    attention[1, 5:] = 0
    model.eval()
    with torch.no_grad():
        stock_eval = model(input_ids=ids, attention_mask=attention).logits
    assert use_cpu_dropout_attention(model)
    assert model.config._attn_implementation == NAME
    with torch.no_grad():  # eval: the stock function, bit for bit
        assert torch.equal(model(input_ids=ids, attention_mask=attention).logits, stock_eval)

    model.train()
    calls = []
    apply = DropoutAttention.apply
    monkeypatch.setattr(DropoutAttention, "apply", lambda *a: calls.append(1) or apply(*a))
    other = ids.clone()
    other[1, 5:] = 7  # different tokens at the padded positions only
    outs = []
    for x in (ids, other):
        torch.manual_seed(5)
        outs.append(model(input_ids=x, attention_mask=attention).logits)
    assert calls, "training on the CPU with dropout goes through DropoutAttention"
    torch.testing.assert_close(outs[0][1, :5], outs[1][1, :5])  # padding is masked out
    outs[0].sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path) if family != "gpt2" else \
        GPT2LMHeadModel.from_pretrained(tmp_path)
    assert reloaded.config._attn_implementation == "sdpa"
    assert NAME not in (tmp_path / "config.json").read_text()


def test_dropout_scales_the_kept_weights_so_the_mean_is_unchanged():
    torch.manual_seed(0)
    q = torch.zeros(1, 1, 1, 4)
    k = torch.zeros(1, 1, 4096, 4)
    v = torch.ones(1, 1, 4096, 4)
    outs = torch.stack([DropoutAttention.apply(q, k, v, None, 0.25, 1.0) for _ in range(50)])
    assert math.isclose(outs.mean().item(), 1.0, abs_tol=0.01)


def test_bf16_autocast_tracks_fp32():
    torch.manual_seed(0)
    q, k, v = leaves((2, 2, 9, 8), (2, 2, 9, 8), (2, 2, 9, 8), dtype=torch.float32)
    results = []
    for enabled in (False, True):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            out = DropoutAttention.apply(q, k, v, None, 0.1, 0.35)
        out.float().square().sum().backward()
        results.append([out.float().detach(), q.grad.clone(), v.grad.clone()])
        assert q.grad.dtype == torch.float32
        q.grad = k.grad = v.grad = None
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_cpu_dropout_module_is_dropout_with_the_keep_mask():
    x = torch.randn(4, 7, 16, dtype=torch.float64, requires_grad=True)
    module = CpuDropout(0.25)
    torch.manual_seed(2)
    out = module(x)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.manual_seed(2)
    keep = keep_mask(x.shape, 0.25).double()
    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(out, x.detach() * keep / 0.75, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, grad * keep / 0.75, rtol=0, atol=1e-12)
    module.eval()
    assert torch.equal(module(x), x)  # eval: the identity, as nn.Dropout


def test_use_cpu_dropout_keeps_parameters_and_the_saved_model(tmp_path):
    torch.manual_seed(0)
    model = _models()["distilbert"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_dropout = sum(type(m) is torch.nn.Dropout for m in model.modules())
    switched = use_cpu_dropout(model)
    assert switched == {"attention": 1, "dropout_modules": n_dropout} and n_dropout > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert model.distilbert.transformer.layer[0].attention.dropout.p == 0.1  # the attention reads its p
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.train()
    model(input_ids=torch.randint(5, 60, (2, 8))).logits.sum().backward()
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, after[k]) for k, v in reloaded.state_dict().items())
    assert not any(isinstance(m, CpuDropout) for m in reloaded.modules())
