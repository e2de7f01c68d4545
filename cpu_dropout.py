"""Dropout for training on the CPU: the attention's, as a registered transformers attention
function, and the hidden states', as a drop-in `nn.Dropout`.

On the CPU, `scaled_dot_product_attention` with `dropout_p > 0` leaves the fused kernel for the
math path: it draws the dropout mask with `bernoulli_` (the costliest op of a small student's step)
and keeps four (batch, heads, queries, keys) tensors for the backward. `DropoutAttention` computes
the same function, softmax(q k^T * scale + mask), dropout, times v, with

  - the keep mask drawn from 16-bit random integers (a fifth of bernoulli_'s time), so the drop
    probability is p rounded to a multiple of 1/32768 (0.1 -> 0.100006);
  - only the probabilities (4 bytes) and the keep mask (1 byte) saved per score, against the math
    path's 13; the dropped probabilities are formed again in the backward.

`CpuDropout` is `nn.Dropout` with the same keep mask, saved as one byte per element (stock
dropout draws floats with `bernoulli_` and keeps them).

Each is used only where it applies: a module in training mode with dropout > 0, on the CPU, without
`output_attentions`; everything else goes to the stock `sdpa` function unchanged (on CUDA the
stock kernels fuse the dropout already). The model stays a stock class with its stock parameters:
`use_cpu_dropout` switches its `attn_implementation` to the registered function (the saved
configuration does not record it, so a saved student loads with the default attention) and
replaces its parameterless `nn.Dropout` children by `CpuDropout` (same `p`).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "causal_distill_cpu_dropout"
_RESOLUTION = 1 << 15


def keep_mask(shape: torch.Size, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool tensor, True with probability 1 - p (p rounded to a multiple of 1/32768), from the CPU generator."""
    threshold = round(p * _RESOLUTION)
    if threshold >= _RESOLUTION:  # (the int16 comparison cannot express it)
        return torch.zeros(shape, dtype=torch.bool)
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(generator=generator)  # 63 random bits each
    lanes = words.view(torch.int16)[:n].bitwise_and_(_RESOLUTION - 1)  # 15 uniform bits per lane
    return (lanes >= threshold).view(shape)


class DropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) with dropout p, times v; q, k, v: (B, heads, L, d).

    mask broadcasts to the scores: bool (True attends) or additive float, or None."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, k, v, mask, p: float, scale: float):
        batch, heads, length, _ = q.shape
        # Three-dimensional bmm on (batch * heads) views: transposed operands are read in place.
        q3, k3, v3 = (x.reshape(batch * heads, x.shape[2], x.shape[3]) for x in (q, k, v))
        scores = torch.bmm(q3 * scale, k3.transpose(1, 2)).view(batch, heads, length, k.shape[2])
        if mask is not None:
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, torch.finfo(scores.dtype).min)
            else:
                scores.add_(mask)
        probs = torch.softmax(scores, dim=-1)
        del scores
        keep = keep_mask(probs.shape, p).view(torch.uint8)  # (uint8 multiplies faster than bool)
        ctx.inv_keep = 1.0 / (1.0 - p)  # the kept weights' scale
        out = torch.bmm((probs * keep).flatten(0, 1), v3).mul_(ctx.inv_keep)
        ctx.save_for_backward(q3, k3, v3, probs, keep)
        ctx.scale = scale
        return out.view(batch, heads, length, v.shape[3])

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        q3, k3, v3, probs, keep = ctx.saved_tensors
        batch, heads, length, keys = probs.shape
        g3 = grad_out.reshape(batch * heads, length, grad_out.shape[3])
        grad_v = torch.bmm((probs * keep).flatten(0, 1).transpose(1, 2), g3).mul_(ctx.inv_keep)
        grad_probs = torch.bmm(g3, v3.transpose(1, 2)).view(probs.shape).mul_(keep)
        grad_scores = torch._softmax_backward_data(grad_probs.to(probs.dtype), probs, -1, probs.dtype).flatten(0, 1)
        del grad_probs
        grad_q = torch.bmm(grad_scores, k3).mul_(ctx.scale * ctx.inv_keep)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q3).mul_(ctx.scale * ctx.inv_keep)
        shape = (batch, heads, -1, q3.shape[2])
        return (grad_q.view(shape).to(q3.dtype), grad_k.view(shape).to(k3.dtype), grad_v.view(shape).to(v3.dtype),
                None, None, None)


def _causal_mask(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril_()


def cpu_dropout_attention_forward(module: nn.Module, query, key, value, attention_mask, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """The transformers attention-function signature; see the module docstring for when it applies."""
    applies = (
        0.0 < dropout < 1.0 and module.training and query.device.type == "cpu" and not kwargs.get("output_attentions")
        and kwargs.get("position_bias") is None and kwargs.get("softcap") is None and kwargs.get("cache") is None
        and getattr(module, "num_key_value_groups", 1) == 1
    )
    if not applies:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal) and attention_mask is None and query.shape[2] > 1
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mask = _causal_mask(query, key) if causal else attention_mask
    out = DropoutAttention.apply(query, key, value, mask, float(dropout), float(scale))
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, cpu_dropout_attention_forward)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_cpu_dropout_attention(model: nn.Module) -> bool:
    """Switch `model` (stock transformers class using sdpa) to the registered function; False if it does not apply."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, AttributeError, NotImplementedError):
        return False
    return True


class _KeepScale(torch.autograd.Function):
    """x * keep / (1 - p), saving the keep mask as uint8."""

    @staticmethod
    def forward(ctx, x, keep, scale: float):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return (x * keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None, None


class CpuDropout(nn.Dropout):
    """`nn.Dropout` whose CPU training path draws its mask with `keep_mask`; elsewhere the stock one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and not self.inplace):
            return super().forward(x)
        keep = keep_mask(x.shape, self.p).view(torch.uint8)
        return _KeepScale.apply(x, keep, 1.0 / (1.0 - self.p))


def use_cpu_dropout(model: nn.Module) -> dict[str, int]:
    """Route `model`'s attention dropout (`use_cpu_dropout_attention`) and its `nn.Dropout` modules
    through this module's CPU kernels; returns what was switched."""
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, CpuDropout(child.p, child.inplace))
                replaced += 1
    return {"attention": int(use_cpu_dropout_attention(model)), "dropout_modules": replaced}
