"""The distillation losses, each defined once as a pure function of tensors.

Rows are selected positions (tokens), already gathered: callers never pass padding.

The vocabulary-wide losses (`ce`/`causal_ce` and `mlm`/`clm`) are computed in row chunks by
`_kl_rows` (or the rows of another `Divergence`) and `_ce_rows`, which return each chunk's loss and
its gradient with respect to the logits in one pass. `soft_target_kl` and `lm_cross_entropy` apply them to given logits;
`head_losses` applies them to logits it computes chunk by chunk from the LM head's features, so
that no (positions x vocabulary) tensor is ever stored: memory grows with the hidden size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The losses of a distillation run, each weighted by causal_train.py's --alpha_<name>: soft targets
# (`ce`), the masked- or causal-LM loss (`mlm`, `clm`), logits MSE (`mse`), hidden-state cosine
# (`cos`) and the DIITO losses on counterfactual runs (`causal_ce`, `causal_cos`).
LOSS_NAMES = ("ce", "mlm", "clm", "mse", "cos", "causal_ce", "causal_cos")

CHUNK_ROWS = {"cpu": 256, "cuda": 4096}  # rows per chunk: temporaries of rows x vocabulary
CHUNK_VOCAB = 32768  # ... for vocabularies up to this size; larger ones (Llama 3, Qwen) get fewer rows
# On CUDA the head's vocabulary is padded to a multiple of this many entries inside `head_losses`:
# with an odd vocabulary (BERT's 30,522) the rows of a half-precision logits chunk are not 16-byte
# aligned, and cuBLAS falls back from Hopper's kernels to slower ones. The padded entries get a
# bias of -1e4 after softening, so their probability is exactly 0 and the losses are unchanged.
# 0 turns it off (the CPU never pads: its results stay bitwise those of the plain computation).
HEAD_ALIGN = {"cuda": 64}
_PAD_LOGIT = -1.0e4


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """fp32 for fp32, bf16 and fp16 inputs (the row kernels' precision), fp64 for fp64 inputs (reference runs)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_rows(t: torch.Tensor, vocab: int) -> int:
    """Rows per chunk: the device's row count, scaled down so a chunk's temporaries stay the same size
    for a large vocabulary (Qwen's 151,936 entries would otherwise take 4.6 times the memory)."""
    rows = CHUNK_ROWS.get(t.device.type, 1024)
    return max(1, min(rows, rows * CHUNK_VOCAB // max(vocab, 1)))


def _kl_rows(s_scaled, t_scaled, want_grad: bool):
    """Sum over rows of KL(softmax(t) || softmax(s)) of already temperature-scaled fp32 logits.

    Returns (loss, d loss / d s or None). Both inputs are scratch: they are overwritten (the
    gradient is built in `s_scaled`'s storage), which keeps the chain to seven passes over the
    rows x vocabulary chunk and no other buffer of that size.
    """
    t_log = F.log_softmax(t_scaled, dim=-1)
    s_log = F.log_softmax(s_scaled, dim=-1)
    t_prob = torch.exp(t_log, out=t_scaled)
    # sum_v p_t (log p_t - log p_s), as one dot product over the chunk
    loss = torch.dot(t_prob.view(-1), t_log.sub_(s_log).view(-1))
    if not want_grad:
        return loss, None
    return loss, torch.exp(s_log, out=s_scaled).sub_(t_prob)  # d/ds KL = p_s - p_t


def _ce_rows(logits, labels, want_grad: bool):
    """Sum over rows of -log softmax(logits)[label] (every label a valid id), and its gradient.

    `logits` is fp32 scratch and is overwritten with the gradient, softmax - onehot(label).
    """
    log_p = F.log_softmax(logits, dim=-1)
    picked = log_p.gather(1, labels[:, None])
    loss = -picked.sum()
    if not want_grad:
        return loss, None
    grad = torch.exp(log_p, out=logits)
    grad.scatter_add_(1, labels[:, None], torch.full_like(picked, -1.0))
    return loss, grad


def _softmax_backward(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """d loss / d logits from d loss / d p (`g`, overwritten) for p = softmax(logits): p * (g - sum(p * g))."""
    g.sub_((p * g).sum(-1, keepdim=True))
    return g.mul_(p)


def _reverse_kl_rows(s_scaled, t_scaled, want_grad: bool, skew: float = 0.0):
    """Sum over rows of KL(p_s || r), r = skew * p_s + (1 - skew) * p_t (r = p_t without skew), and d/ds."""
    s_log, t_log = F.log_softmax(s_scaled, dim=-1), F.log_softmax(t_scaled, dim=-1)
    p_s = s_log.exp()
    r_log = t_log if skew == 0 else torch.logaddexp(s_log + math.log(skew), t_log + math.log1p(-skew))
    d = s_log - r_log
    loss = torch.dot(p_s.view(-1), d.view(-1))
    if not want_grad:
        return loss, None
    if skew:  # d/dp_s: log p_s - log r + 1 - skew * p_s / r (the constant 1 cancels through the softmax)
        d.sub_(d.exp().mul_(skew))  # (d = log p_s - log r, so exp(d) = p_s / r)
    return loss, _softmax_backward(p_s, d)


def _skew_kl_rows(s_scaled, t_scaled, want_grad: bool, skew: float):
    """Sum over rows of KL(p_t || q), q = skew * p_t + (1 - skew) * p_s (DistiLLM's skew KL), and d/ds."""
    s_log, t_log = F.log_softmax(s_scaled, dim=-1), F.log_softmax(t_scaled, dim=-1)
    p_t = t_log.exp()
    q_log = torch.logaddexp(t_log + math.log(skew), s_log + math.log1p(-skew))
    loss = torch.dot(p_t.view(-1), (t_log - q_log).view(-1))
    if not want_grad:
        return loss, None
    g = (t_log - q_log).exp_().mul_(-(1 - skew))  # d/dp_s = -(1 - skew) p_t / q
    return loss, _softmax_backward(s_log.exp(), g)


def _jsd_rows(s_scaled, t_scaled, want_grad: bool, beta: float):
    """Sum over rows of the generalised Jensen-Shannon divergence of GKD (TRL's generalized_jsd_loss), m =
    beta * p_t + (1 - beta) * p_s: beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), and d/ds."""
    s_log, t_log = F.log_softmax(s_scaled, dim=-1), F.log_softmax(t_scaled, dim=-1)
    p_s, p_t = s_log.exp(), t_log.exp()
    m_log = torch.logaddexp(t_log + math.log(beta), s_log + math.log1p(-beta))
    s_part = s_log - m_log
    loss = beta * torch.dot(p_t.view(-1), (t_log - m_log).view(-1)) + (1 - beta) * torch.dot(p_s.view(-1),
                                                                                            s_part.view(-1))
    if not want_grad:
        return loss, None
    return loss, _softmax_backward(p_s, s_part.mul_(1 - beta))  # d/dp_s = (1 - beta) (log p_s - log m)


def _tvd_rows(s_scaled, t_scaled, want_grad: bool):
    """Sum over rows of the total variation distance 1/2 sum_v |p_s - p_t|, and d/ds (a subgradient: 0 at ties)."""
    p_s, p_t = F.softmax(s_scaled, dim=-1), F.softmax(t_scaled, dim=-1)
    diff = p_s - p_t
    loss = 0.5 * diff.abs().sum()
    if not want_grad:
        return loss, None
    return loss, _softmax_backward(p_s, diff.sign_().mul_(0.5))


@dataclass(frozen=True)
class Divergence:
    """What a soft-target term (`ce`, `causal_ce`) measures between the softened teacher and student distributions.

    name: forward_kl (KL(p_t || p_s), the original's), reverse_kl (KL(p_s || p_t)), jsd (the generalised
    Jensen-Shannon divergence of GKD with `beta`; as in TRL, beta 0 is the forward KL and beta 1 the reverse KL)
    or tvd (total variation). `skew` (DistiLLM, forward and reverse KL only): the student's side is mixed with
    the other distribution, KL(p_t || skew p_t + (1 - skew) p_s) and KL(p_s || skew p_s + (1 - skew) p_t).
    Every divergence is taken between softmax(logits / T) and multiplied by T^2, as the KL always was.
    """

    name: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.0

    def __post_init__(self):
        if self.name not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.name!r} (one of {', '.join(DIVERGENCES)})")
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.skew < 1.0:
            raise ValueError(f"beta must lie in [0, 1] and skew in [0, 1), got {self.beta} and {self.skew}")
        if self.skew and self.name not in ("forward_kl", "reverse_kl"):
            raise ValueError(f"a skew applies to forward_kl and reverse_kl, not {self.name}")

    @property
    def is_forward_kl(self) -> bool:
        """The original objective, through the fused (and optionally compiled) KL kernel."""
        return self.rows_name == "forward_kl" and not self.skew

    @property
    def rows_name(self) -> str:
        if self.name == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return self.name

    def rows(self, s_scaled, t_scaled, want_grad: bool):
        """(sum over rows of the divergence, d/d s_scaled or None) of temperature-scaled logits (fp32/fp64
        scratch: they may be overwritten)."""
        name = self.rows_name
        if name == "forward_kl":
            return _kl_rows(s_scaled, t_scaled, want_grad) if not self.skew else \
                _skew_kl_rows(s_scaled, t_scaled, want_grad, self.skew)
        if name == "reverse_kl":
            return _reverse_kl_rows(s_scaled, t_scaled, want_grad, self.skew)
        if name == "jsd":
            return _jsd_rows(s_scaled, t_scaled, want_grad, self.beta)
        return _tvd_rows(s_scaled, t_scaled, want_grad)


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
FORWARD_KL = Divergence()


def _kl_rows_fusable(s_raw, t_raw, s_bias, t_bias, inv_temperature: float):
    """`_kl_rows` from the projections' outputs before bias and softening, written for torch.compile:
    the bias, the 1/T, both log-softmaxes, the loss and the gradient fuse into a few passes."""
    s_log = F.log_softmax((s_raw.float() + s_bias.float()) * inv_temperature, dim=-1)
    t_log = F.log_softmax((t_raw.float() + t_bias.float()) * inv_temperature, dim=-1)
    t_prob = t_log.exp()
    return (t_prob * (t_log - s_log)).sum(), s_log.exp() - t_prob


_compiled_kl = None  # set by `use_compiled_kernels`


def use_compiled_kernels(enable: bool = True) -> None:
    """Run the KL chunks through `torch.compile` (C++ on the CPU, Triton on CUDA): `--compile`.

    The first call compiles (tens of seconds on a small CPU); chunk sizes are dynamic, so it
    compiles once. Only this pure function is compiled: the models and their hooks run eagerly.
    """
    global _compiled_kl
    _compiled_kl = torch.compile(_kl_rows_fusable, dynamic=True) if enable else None


class _RowLoss(torch.autograd.Function):
    """A chunked row loss on given logits; the gradient is formed in the forward pass."""

    @staticmethod
    def forward(ctx, logits, other, kind, temperature, n_norm):
        needs_grad = ctx.needs_input_grad[0]
        acc = _accumulation_dtype(logits)
        grad = torch.empty(logits.shape, dtype=acc, device=logits.device) if needs_grad else None
        total = logits.new_zeros((), dtype=acc)
        step = _chunk_rows(logits, logits.shape[-1])
        scale = 1.0 / max(n_norm, 1)
        for start in range(0, logits.shape[0], step):
            rows = slice(start, start + step)
            if kind != "ce":  # a Divergence; fresh scaled copies: the caller's tensors are never written
                loss, g = kind.rows(logits[rows].to(acc) / temperature, other[rows].to(acc) / temperature,
                                    needs_grad)
                g = g.mul_(1.0 / temperature) if needs_grad else None
            else:
                loss, g = _ce_rows(logits[rows].to(acc, copy=True), other[rows], needs_grad)
            total += loss
            if needs_grad:
                grad[rows] = g
        ctx.save_for_backward(grad.mul_(scale) if needs_grad else None)
        ctx.dtype = logits.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.dtype), None, None, None, None


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                     divergence: Divergence = FORWARD_KL) -> torch.Tensor:
    """`ce`/`causal_ce`: the `divergence` of the temperature-softened distributions, times T², averaged over
    the N positions of (N, V) student and teacher logits. The forward KL (the default, the original's):

        T² / N * sum_i sum_v p_t(v) * (log p_t(v) - log p_s(v)),   p = softmax(logits / T)
    """
    t = float(temperature)
    return _RowLoss.apply(student_logits, teacher_logits, divergence, t, student_logits.shape[0]) * (t * t)


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`soft_target_loss` with the forward KL, KL(teacher || student)."""
    return soft_target_loss(student_logits, teacher_logits, temperature, FORWARD_KL)


def lm_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`mlm`/`clm`: mean cross-entropy of (N, V) logits against (N,) target ids.

    For MLM the rows are the masked tokens; for CLM row t predicts token t+1 (the shift is made
    when the batch is prepared). Zero rows give 0.
    """
    return _RowLoss.apply(logits, targets, "ce", 1.0, targets.shape[0])


class _HeadLosses(torch.autograd.Function):
    """alpha_kl * soft_target_loss + alpha_lm * lm_cross_entropy on logits = features @ W.T + b,
    computed chunk by chunk; returns (weighted total, kl value, lm value).

    The KL covers every row; the LM loss projects only its labelled rows (the MLM-masked tokens),
    so its vocabulary-wide work scales with the masked tokens, not with all of them."""

    @staticmethod
    def forward(ctx, s_feat, weight, bias, t_feat, t_weight, t_bias, lm_rows, lm_targets, temperature, alpha_kl,
                alpha_lm, divergence):
        n, n_lm = s_feat.shape[0], lm_rows.shape[0]
        t = temperature
        acc = _accumulation_dtype(s_feat)  # fp32, or fp64 for an fp64 model
        kl_total = s_feat.new_zeros((), dtype=acc)
        lm_total = s_feat.new_zeros((), dtype=acc)
        g_feat = torch.zeros_like(s_feat)
        vocab, has_bias = weight.shape[0], bias is not None
        step = _chunk_rows(s_feat, vocab)
        autocast = torch.is_autocast_enabled(s_feat.device.type)
        weight, t_weight, (kl_bias, kl_t_bias, lm_bias) = _aligned_heads(
            weight, t_weight, bias, t_bias, t, torch.get_autocast_dtype(s_feat.device.type) if autocast else None, acc)
        padded = weight.shape[0] != vocab
        g_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        g_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if has_bias else None

        def logits(feat, w, b, scale):
            # scale * (feat @ w.T + b) in one GEMM, as fp32 (fp64) scratch for the row kernels
            out = torch.addmm(b, feat, w.t(), beta=scale, alpha=scale) if b is not None else \
                torch.mm(feat, w.t()).mul_(scale)
            return out.to(acc)

        def backward_of_projection(grad, feat, scale):
            # The projection's backward for scale * grad, chunk by chunk.
            if autocast:  # the matmul runs in the autocast precision, the sum in fp32
                g_weight.add_(torch.mm(grad.t(), feat), alpha=scale)
            else:
                torch.addmm(g_weight, grad.t(), feat, alpha=scale, out=g_weight)  # (counted by FlopCounterMode)
            if g_bias is not None:
                g_bias.add_(grad.sum(0), alpha=scale)
            return torch.mm(grad, weight).mul_(scale).to(g_feat.dtype)

        if alpha_kl > 0:
            # d(T^2 D)/d(logits) = T dD/d(logits / T): the 1/T of the softening times T^2
            kl_scale = alpha_kl * t / max(n, 1)
            compiled = _compiled_kl if divergence.is_forward_kl else None  # (only the KL kernel is compiled)
            if compiled is not None:
                s_bias = kl_bias if kl_bias is not None else weight.new_zeros(weight.shape[0])
                t_bias_ = kl_t_bias if kl_t_bias is not None else t_weight.new_zeros(t_weight.shape[0])
            for start in range(0, n, step):
                rows = slice(start, start + step)
                if compiled is not None:
                    s_raw = torch.mm(s_feat[rows], weight.t())
                    with torch.no_grad():
                        t_raw = torch.mm(t_feat[rows], t_weight.t())
                    loss, grad = compiled(s_raw, t_raw, s_bias, t_bias_, 1.0 / t)
                else:
                    s_scaled = logits(s_feat[rows], weight, kl_bias, 1.0 / t)
                    with torch.no_grad():
                        t_scaled = logits(t_feat[rows], t_weight, kl_t_bias, 1.0 / t)
                    loss, grad = divergence.rows(s_scaled, t_scaled, True)
                kl_total += loss
                g_feat[rows] = backward_of_projection(grad, s_feat[rows], kl_scale)
        if alpha_lm > 0 and n_lm > 0:
            lm_feat = s_feat.index_select(0, lm_rows)
            lm_scale = alpha_lm / n_lm
            for start in range(0, n_lm, step):
                rows = slice(start, start + step)
                loss, grad = _ce_rows(logits(lm_feat[rows], weight, lm_bias, 1.0), lm_targets[rows], True)
                lm_total += loss
                g_feat.index_add_(0, lm_rows[rows], backward_of_projection(grad, lm_feat[rows], lm_scale))
        if padded:
            g_weight = g_weight[:vocab]
            g_bias = g_bias[:vocab] if g_bias is not None else None
        ctx.save_for_backward(g_feat, g_weight, g_bias if g_bias is not None else torch.empty(0))
        ctx.has_bias = has_bias
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
                None, None, None, None, None, None, None, None, None)


def _aligned_heads(weight, t_weight, bias, t_bias, temperature: float, autocast_dtype, acc=torch.float32):
    """The student's and teacher's heads padded to a multiple of HEAD_ALIGN[device] rows (cast to the
    autocast precision), and the biases of the KL and LM logits: -1e4 at the padded entries once
    softened (by 1/T for the KL, 1 for the LM loss). Unchanged where no padding is needed."""
    align, vocab = HEAD_ALIGN.get(weight.device.type, 0), weight.shape[0]
    if align <= 1 or vocab % align == 0:
        return weight, t_weight, (bias, t_bias, bias)
    dtype = autocast_dtype or weight.dtype
    weight = _pad_rows(weight.to(dtype), align)
    t_weight = _pad_rows(t_weight.to(dtype), align) if t_weight is not None else None

    def pad_bias(b, scale):
        out = torch.full((weight.shape[0],), _PAD_LOGIT / scale, dtype=acc, device=weight.device)
        out[:vocab] = b if b is not None else 0.0
        return out

    return weight, t_weight, (pad_bias(bias, 1.0 / temperature), pad_bias(t_bias, 1.0 / temperature),
                              pad_bias(bias, 1.0))


def _pad_rows(w: torch.Tensor, multiple: int) -> torch.Tensor:
    """`w` (V, H) with zero rows appended up to a multiple of `multiple` rows."""
    extra = -w.shape[0] % multiple
    return torch.cat([w, w.new_zeros(extra, w.shape[1])]) if extra else w


def head_losses(
    s_features: torch.Tensor,
    projection: torch.nn.Linear,
    t_features: torch.Tensor | None,
    t_projection: torch.nn.Linear | None,
    lm_rows: torch.Tensor | None,
    lm_targets: torch.Tensor | None,
    temperature: float,
    alpha_kl: float,
    alpha_lm: float,
    divergence: Divergence = FORWARD_KL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`alpha_kl * ce + alpha_lm * lm` from the LM head's features, without storing any logits; `ce` is the
    soft-target `divergence` (the forward KL by default).

    s_features: (N, H) student features before the vocabulary projection (with gradients);
    t_features: (N, H) teacher features at the same rows (or None when alpha_kl is 0);
    lm_rows: (M,) the rows with an LM target, lm_targets: (M,) their target ids (or None).
    Returns (weighted total with gradients, ce value, lm value); the values equal
    `soft_target_loss` and `lm_cross_entropy` on the materialised logits.
    """
    t_weight = t_projection.weight if t_projection is not None else None
    t_bias = t_projection.bias if t_projection is not None else None
    if lm_rows is None:
        lm_rows = torch.zeros(0, dtype=torch.long, device=s_features.device)
        lm_targets = lm_rows
    return _HeadLosses.apply(s_features, projection.weight, projection.bias, t_features, t_weight, t_bias, lm_rows,
                             lm_targets, float(temperature), float(alpha_kl), float(alpha_lm), divergence)


def logits_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """`mse`: squared error of the logits, summed and divided by the number of positions."""
    acc = _accumulation_dtype(student_logits)  # fp32 for low-precision logits; fp64 references stay fp64
    diff = student_logits.to(acc) - teacher_logits.to(acc)
    return (diff * diff).sum() / max(student_logits.shape[0], 1)


def hidden_cosine(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """`cos`/`causal_cos`: mean over positions of 1 - cosine(student, teacher) of (N, H) hidden states."""
    if student_hidden.shape[0] == 0:
        return student_hidden.sum() * 0.0
    acc = _accumulation_dtype(student_hidden)
    cos = F.cosine_similarity(student_hidden.to(acc), teacher_hidden.to(acc), dim=-1)
    return (1.0 - cos).mean()
