"""The distillation losses, each defined once as a pure function of tensors.

Rows are selected positions (tokens), already gathered: callers never pass padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`ce`/`causal_ce`: KL(teacher || student) of the temperature-softened distributions, times T².

    Inputs are (N, V) logits at N selected positions; the result is averaged over positions.
    """
    t = temperature
    s_log = F.log_softmax(student_logits.float() / t, dim=-1)
    t_log = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(s_log, t_log, reduction="sum", log_target=True)
    return kl / max(student_logits.shape[0], 1) * t * t


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
