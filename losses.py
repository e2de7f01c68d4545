"""The distillation losses, each defined once as a pure function of tensors.

Rows are selected positions (tokens), already gathered: callers never pass padding.

The vocabulary-wide losses (`ce`/`causal_ce` and `mlm`/`clm`) are computed in row chunks by
`_kl_rows` and `_ce_rows`, which return each chunk's loss and its gradient with respect to the
logits in one pass. `soft_target_kl` and `lm_cross_entropy` apply them to given logits;
`head_losses` applies them to logits it computes chunk by chunk from the LM head's features, so
that no (positions x vocabulary) tensor is ever stored: memory grows with the hidden size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ROWS = {"cpu": 256, "cuda": 4096}  # rows per chunk: temporaries of rows x vocabulary


def _chunk_rows(t: torch.Tensor) -> int:
    return CHUNK_ROWS.get(t.device.type, 1024)


def _kl_rows(s_logits, t_logits, temperature: float, grad_scale: float | None):
    """Sum over rows of KL(softmax(t/T) || softmax(s/T)), and optionally its gradient wrt s times grad_scale."""
    s_log = F.log_softmax(s_logits.float() / temperature, dim=-1)
    t_log = F.log_softmax(t_logits.float() / temperature, dim=-1)
    t_prob = t_log.exp()
    loss = (t_prob * (t_log - s_log)).sum()
    if grad_scale is None:
        return loss, None
    # d/ds KL = (p_s - p_t) / T
    return loss, s_log.exp_().sub_(t_prob).mul_(grad_scale / temperature)


def _ce_rows(logits, labels, grad_scale: float | None):
    """Sum over rows with label >= 0 of -log softmax(logits)[label]; rows with label < 0 count 0."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    valid = labels >= 0
    safe = labels.clamp(min=0)
    picked = log_p.gather(1, safe[:, None])[:, 0]
    loss = -(picked * valid).sum()
    if grad_scale is None:
        return loss, None
    grad = log_p.exp_()
    grad.scatter_add_(1, safe[:, None], -valid[:, None].to(grad.dtype))
    return loss, grad.mul_(valid[:, None].to(grad.dtype) * grad_scale)


class _RowLoss(torch.autograd.Function):
    """A chunked row loss on given logits; the gradient is formed in the forward pass."""

    @staticmethod
    def forward(ctx, logits, other, kind, temperature, n_norm):
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if needs_grad else None
        total = logits.new_zeros((), dtype=torch.float32)
        step = _chunk_rows(logits)
        scale = 1.0 / max(n_norm, 1)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            if kind == "kl":
                loss, g = _kl_rows(logits[rows], other[rows], temperature, scale if needs_grad else None)
            else:
                loss, g = _ce_rows(logits[rows], other[rows], scale if needs_grad else None)
            total += loss
            if needs_grad:
                grad[rows] = g
        ctx.save_for_backward(grad)
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`ce`/`causal_ce`: KL(teacher || student) of the temperature-softened distributions, times T².

    Inputs are (N, V) logits at N selected positions; the result is averaged over positions:

        T² / N * sum_i sum_v p_t(v) * (log p_t(v) - log p_s(v)),   p = softmax(logits / T)
    """
    t = float(temperature)
    return _RowLoss.apply(student_logits, teacher_logits, "kl", t, student_logits.shape[0]) * (t * t)


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`mlm`/`clm`: mean cross-entropy of (N, V) logits against (N,) target ids.

    For MLM the rows are the masked tokens; for CLM row t predicts token t+1 (the shift is made
    when the batch is prepared). Zero rows give 0.
    """
    return _RowLoss.apply(logits, targets, "ce", 1.0, targets.shape[0])


class _HeadLosses(torch.autograd.Function):
    """alpha_kl * soft_target_kl + alpha_lm * lm_cross_entropy on logits = features @ W.T + b,
    computed chunk by chunk; returns (weighted total, kl value, lm value)."""

    @staticmethod
    def forward(ctx, s_feat, weight, bias, t_feat, t_weight, t_bias, labels, n_lm, temperature, alpha_kl, alpha_lm):
        n = s_feat.shape[0]
        t = temperature
        kl_total = s_feat.new_zeros((), dtype=torch.float32)
        lm_total = s_feat.new_zeros((), dtype=torch.float32)
        g_feat = torch.zeros_like(s_feat)
        g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        g_bias = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
        step = _chunk_rows(s_feat)
        kl_scale = alpha_kl * t * t / max(n, 1)
        lm_scale = alpha_lm / max(n_lm, 1)
        for start in range(0, n, step):
            rows = slice(start, start + step)
            s_logits = F.linear(s_feat[rows], weight, bias)
            grad = None
            if alpha_kl > 0:
                with torch.no_grad():
                    t_logits = F.linear(t_feat[rows], t_weight, t_bias)
                loss, grad = _kl_rows(s_logits, t_logits, t, kl_scale)
                kl_total += loss
            if alpha_lm > 0:
                loss, g = _ce_rows(s_logits, labels[rows], lm_scale)
                lm_total += loss
                grad = g if grad is None else grad.add_(g)
            # The projection's backward, chunk by chunk (autocast picks the matmul precision).
            g_feat[rows] = torch.matmul(grad, weight)
            g_weight += torch.matmul(grad.t(), s_feat[rows])
            if g_bias is not None:
                g_bias += grad.sum(0)
        ctx.save_for_backward(g_feat, g_weight, g_bias if g_bias is not None else torch.empty(0))
        ctx.has_bias = bias is not None
        kl = kl_total * (t * t / max(n, 1))
        lm = lm_total / max(n_lm, 1)
        total = alpha_kl * kl + alpha_lm * lm
        ctx.mark_non_differentiable(kl, lm)
        return total, kl, lm

    @staticmethod
    def backward(ctx, grad_total, _grad_kl, _grad_lm):
        g_feat, g_weight, g_bias = ctx.saved_tensors
        g_bias = g_bias * grad_total if ctx.has_bias else None
        return (g_feat * grad_total.to(g_feat.dtype), g_weight * grad_total, g_bias,
                None, None, None, None, None, None, None, None)


def head_losses(
    s_features: torch.Tensor,
    projection: torch.nn.Linear,
    t_features: torch.Tensor | None,
    t_projection: torch.nn.Linear | None,
    labels: torch.Tensor | None,
    n_lm: int,
    temperature: float,
    alpha_kl: float,
    alpha_lm: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`alpha_kl * ce + alpha_lm * lm` from the LM head's features, without storing any logits.

    s_features: (N, H) student features before the vocabulary projection (with gradients);
    t_features: (N, H) teacher features at the same rows (or None when alpha_kl is 0);
    labels: (N,) LM target per row, -1 where a row has none; n_lm: the number of labelled rows.
    Returns (weighted total with gradients, ce value, lm value); the values equal
    `soft_target_kl` and `lm_cross_entropy` on the materialised logits.
    """
    t_weight = t_projection.weight if t_projection is not None else None
    t_bias = t_projection.bias if t_projection is not None else None
    if labels is None:
        labels = torch.full((s_features.shape[0],), -1, dtype=torch.long, device=s_features.device)
    return _HeadLosses.apply(s_features, projection.weight, projection.bias, t_features, t_weight, t_bias, labels,
                             int(n_lm), float(temperature), float(alpha_kl), float(alpha_lm))


def logits_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """`mse`: squared error of the logits, summed and divided by the number of positions."""
    diff = student_logits.float() - teacher_logits.float()
    return (diff * diff).sum() / max(student_logits.shape[0], 1)


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """`cos`/`causal_cos`: mean over positions of 1 - cosine(student, teacher) of (N, H) hidden states."""
    if student_hidden.shape[0] == 0:
        return student_hidden.sum() * 0.0
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
    return (1.0 - cos).mean()
