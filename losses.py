"""The distillation losses, each defined once as a pure function of tensors.

Rows are selected positions (tokens), already gathered: callers never pass padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


KL_CHUNK_ROWS = 256  # rows per chunk: a chunk's temporaries (rows x vocabulary) stay in cache


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`ce`/`causal_ce`: KL(teacher || student) of the temperature-softened distributions, times T².

    Inputs are (N, V) logits at N selected positions; the result is averaged over positions:

        T² / N * sum_i sum_v p_t(v) * (log p_t(v) - log p_s(v)),   p = softmax(logits / T)

    Computed in row chunks, in float32, with the gradient formed in the same pass
    (d/ds = T * (p_s - p_t) / N), so no (N, V) temporaries beyond the one saved gradient.
    """
    return _SoftTargetKL.apply(student_logits, teacher_logits, float(temperature))


class _SoftTargetKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_logits, temperature):
        n = student_logits.shape[0]
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student_logits) if needs_grad else None
        total = student_logits.new_zeros((), dtype=torch.float32)
        scale = temperature / max(n, 1)
        for start in range(0, n, KL_CHUNK_ROWS):
            rows = slice(start, start + KL_CHUNK_ROWS)
            s_log = F.log_softmax(student_logits[rows].float() / temperature, dim=-1)
            t_log = F.log_softmax(teacher_logits[rows].float() / temperature, dim=-1)
            t_prob = t_log.exp()
            total += (t_prob * (t_log - s_log)).sum()
            if needs_grad:
                grad[rows] = (s_log.exp_().sub_(t_prob)).mul_(scale)
        ctx.save_for_backward(grad)
        return total * (temperature * temperature / max(n, 1))

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)) if grad is not None else None, None, None


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`mlm`/`clm`: mean cross-entropy of (N, V) logits against (N,) target ids.

    For MLM the rows are the masked tokens; for CLM row t predicts token t+1 (the shift is made
    when the batch is prepared). Zero rows give 0.
    """
    if targets.numel() == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), targets, reduction="mean")


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
