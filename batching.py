"""Turn a collated batch into model inputs: MLM masking or CLM targets, selected rows, interchange positions.

Everything here runs on the CPU, vectorised, before the batch is moved to the device, so that the
training step needs no host synchronisation (no `.item()`, no `nonzero` on the GPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from binarized_io import load_token_counts
from utils import CliError, require_file


@dataclass
class Prepared:
    """Model inputs of one base/source batch (CPU tensors until `.to(device)`).

    input_ids, attention_mask: (B, L) base input (MLM-masked when training MLM).
    source_ids, source_mask: (B, L) source input, or None without a causal objective.
    real_idx: (R,) flat indices (into B*L) of every real base token (for `cos`).
    logit_idx: (N,) flat indices of the base positions where logits are compared (`ce`, `mse`).
    lm_rows: (M,) rows of logit_idx that carry an LM target; lm_targets: (M,) their target ids.
    batch_idx, base_pos, source_pos: (I,) aligned interchange positions.
    mlm_mask: (B, L) bool, the MLM-chosen tokens (None for CLM).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    real_idx: torch.Tensor
    logit_idx: torch.Tensor
    lm_rows: torch.Tensor
    lm_targets: torch.Tensor
    source_ids: torch.Tensor | None = None
    source_mask: torch.Tensor | None = None
    batch_idx: torch.Tensor | None = None
    base_pos: torch.Tensor | None = None
    source_pos: torch.Tensor | None = None
    mlm_mask: torch.Tensor | None = None
    n_real_tokens: int = 0

    def to(self, device: torch.device) -> "Prepared":
        if device.type == "cpu":
            return self
        moved = {}
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                value = value.pin_memory().to(device, non_blocking=True)
            moved[key] = value
        return Prepared(**moved)



def length_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] < lengths[:, None]


class BatchPreparer:
    """Prepares batches for `CausalDistiller`; holds the masking and interchange settings.

    token_probs: (V,) masking weight of each token id (frequency-smoothed; 0 for special tokens).
    pred_probs: (3,) probabilities of [MASK] / keep / random for a chosen token.
    interchange_mode: "random" or "consecutive"; masked_only: base positions among MLM-masked tokens.
    pad_to_multiple_of: widen each batch with padding to a multiple of this many positions (at most
    `max_width`): on CUDA a few distinct shapes let kernels and attention plans be reused.
    """

    def __init__(
        self,
        *,
        mlm: bool,
        vocab_size: int,
        mask_id: int | None = None,
        token_probs: torch.Tensor | None = None,
        mlm_mask_prop: float = 0.15,
        pred_probs: tuple[float, float, float] = (0.8, 0.1, 0.1),
        restrict_ce_to_mask: bool = False,
        interchange_prop: float = 0.3,
        interchange_max_token: int = -1,
        interchange_mode: str = "random",
        masked_only: bool = False,
        pad_to_multiple_of: int = 1,
        max_width: int | None = None,
        pad_id: int = 0,
    ):
        self.mlm = mlm
        self.pad_to_multiple_of = max(1, pad_to_multiple_of)
        self.max_width = max_width
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.mask_id = mask_id
        self.token_probs = token_probs.float() if token_probs is not None else None
        self.mlm_mask_prop = mlm_mask_prop
        self.pred_probs = torch.tensor(pred_probs, dtype=torch.float)
        self.restrict_ce_to_mask = restrict_ce_to_mask
        self.interchange_prop = interchange_prop
        self.interchange_max_token = interchange_max_token
        self.interchange_mode = interchange_mode
        self.masked_only = masked_only
        if mlm and (token_probs is None or mask_id is None):
            raise ValueError("MLM needs token_probs and mask_id")

    # --- masking -------------------------------------------------------------------------------
    def mask_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose ceil(mlm_mask_prop * real tokens) positions by smoothed frequency, then 80/10/10.

        Returns (masked ids, chosen (B, L) bool). Padding and special tokens are never chosen.
        """
        weights = self.token_probs[ids] * mask
        n_real = int(mask.sum())
        n_candidates = int((weights > 0).sum())
        n_tgt = min(math.ceil(self.mlm_mask_prop * n_real), n_candidates)
        chosen = torch.zeros(ids.numel(), dtype=torch.bool)
        if n_tgt > 0:
            picked = torch.multinomial(weights.flatten(), n_tgt, replacement=False)
            chosen[picked] = True
        chosen = chosen.view_as(ids)
        action = torch.multinomial(self.pred_probs, ids.numel(), replacement=True).view_as(ids)
        random_ids = torch.randint(0, self.vocab_size, ids.shape)
        out = ids.clone()
        out = torch.where(chosen & (action == 0), torch.full_like(ids, self.mask_id), out)
        out = torch.where(chosen & (action == 2), random_ids, out)
        return out, chosen

    # --- interchange positions -----------------------------------------------------------------
    def interchange_counts(self, base_len: torch.Tensor, source_len: torch.Tensor) -> torch.Tensor:
        """Per example: int(min(len_base, len_source) * prop), capped by interchange_max_token."""
        counts = (torch.minimum(base_len, source_len).double() * self.interchange_prop).long()
        if self.interchange_max_token != -1:
            counts = counts.clamp(max=self.interchange_max_token)
        return counts

    def _pick(self, eligible: torch.Tensor, lengths: torch.Tensor, counts: torch.Tensor, consecutive: bool):
        """A (B, L) bool with counts[b] True entries per row, among `eligible` ones."""
        bsz, width = eligible.shape
        cols = torch.arange(width)[None, :]
        if consecutive:
            room = (lengths - counts + 1).clamp(min=1)
            start = (torch.rand(bsz) * room).long()
            return (cols >= start[:, None]) & (cols < (start + counts)[:, None])
        scores = torch.rand(bsz, width).masked_fill(~eligible, 2.0)
        order = scores.argsort(dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, cols.expand(bsz, width).contiguous())
        return rank < counts[:, None]

    def interchange_positions(
        self,
        base_len: torch.Tensor,
        source_len: torch.Tensor,
        width: int,
        mlm_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Aligned (batch_idx, base_pos, source_pos): the k-th chosen base position of an example
        takes the k-th chosen source position. Only real tokens are chosen, never padding."""
        counts = self.interchange_counts(base_len, source_len)
        consecutive = self.interchange_mode == "consecutive"
        base_ok = length_mask(base_len, width)
        if self.masked_only and mlm_mask is not None:
            base_ok = base_ok & mlm_mask
            counts = torch.minimum(counts, base_ok.sum(1))
            base_sel = self._pick(base_ok, base_len, counts, consecutive=False)
        else:
            base_sel = self._pick(base_ok, base_len, counts, consecutive)
        source_sel = self._pick(length_mask(source_len, width), source_len, counts, consecutive)
        batch_idx, base_pos = base_sel.nonzero(as_tuple=True)
        _, source_pos = source_sel.nonzero(as_tuple=True)
        return batch_idx, base_pos, source_pos

    def widen(self, ids: torch.Tensor | None) -> torch.Tensor | None:
        """`ids` (B, L) padded on the right to a multiple of `pad_to_multiple_of` (capped at `max_width`)."""
        if ids is None or self.pad_to_multiple_of == 1:
            return ids
        width = ids.shape[1]
        target = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        if self.max_width is not None:
            target = max(width, min(target, self.max_width))
        if target == width:
            return ids
        return torch.nn.functional.pad(ids, (0, target - width), value=self.pad_id)

    # --- the whole batch -----------------------------------------------------------------------
    def prepare(self, batch: dict, causal: bool, reverse: bool = False) -> Prepared:
        """Prepare a collated batch (`base_ids`, `base_lengths`[, `source_ids`, `source_lengths`]; with on-policy
        samples also `base_prompt_lengths` and `source_prompt_lengths`, causal LMs only).

        causal: sample interchange positions and keep the source input.
        reverse: use the source as base and the base as source (--include_crossway).
        """
        base_ids, base_len = batch["base_ids"], batch["base_lengths"]
        source_ids, source_len = batch.get("source_ids"), batch.get("source_lengths")
        base_ids, source_ids = self.widen(base_ids), self.widen(source_ids)
        prompt_len = batch.get("source_prompt_lengths" if reverse else "base_prompt_lengths")  # (on-policy samples)
        if reverse:
            base_ids, source_ids, base_len, source_len = source_ids, base_ids, source_len, base_len
        width = base_ids.shape[1]
        base_mask = length_mask(base_len, width)
        flat_real = base_mask.flatten().nonzero(as_tuple=True)[0]
        mlm_mask = None
        if self.mlm:
            input_ids, mlm_mask = self.mask_tokens(base_ids, base_mask)
            flat_lm = mlm_mask.flatten().nonzero(as_tuple=True)[0]
            lm_targets = base_ids.flatten()[flat_lm]
            if self.restrict_ce_to_mask:
                logit_idx = flat_lm
                lm_rows = torch.arange(flat_lm.numel())
            else:
                logit_idx = flat_real
                rank_in_real = base_mask.flatten().long().cumsum(0) - 1
                lm_rows = rank_in_real[flat_lm]
        else:
            input_ids = base_ids
            if prompt_len is not None:
                # The student's own continuation of a prompt: the soft targets at the rows that predict a
                # sampled token (and the last); no LM target, the samples being no ground truth.
                logit_idx = (base_mask & ~length_mask(prompt_len - 1, width)).flatten().nonzero(as_tuple=True)[0]
                lm_rows = lm_targets = torch.zeros(0, dtype=torch.long)
            else:
                # Row t predicts token t+1: every real token that has a real successor.
                has_next = base_mask & length_mask(base_len - 1, width)
                logit_idx = flat_real
                rank_in_real = base_mask.flatten().long().cumsum(0) - 1
                flat_lm = has_next.flatten().nonzero(as_tuple=True)[0]
                lm_rows = rank_in_real[flat_lm]
                lm_targets = base_ids.flatten()[flat_lm + 1]
        prepared = Prepared(
            input_ids=input_ids,
            attention_mask=base_mask.long(),
            real_idx=flat_real,
            logit_idx=logit_idx,
            lm_rows=lm_rows,
            lm_targets=lm_targets,
            mlm_mask=mlm_mask,
            n_real_tokens=int(base_len.sum()),
        )
        if causal:
            if source_ids is None:
                raise ValueError("a causal objective needs paired batches (source_ids)")
            source_mask = length_mask(source_len, width)
            if self.mlm:
                source_input, _ = self.mask_tokens(source_ids, source_mask)
            else:
                source_input = source_ids
            prepared.source_ids = source_input
            prepared.source_mask = source_mask.long()
            batch_idx, base_pos, source_pos = self.interchange_positions(base_len, source_len, width, mlm_mask)
            prepared.batch_idx, prepared.base_pos, prepared.source_pos = batch_idx, base_pos, source_pos
        return prepared


def load_token_probs(path, smoothing: float, vocab_size: int, special_ids: dict[str, int]) -> torch.Tensor:
    """The MLM masking weight of each token id, `BatchPreparer`'s `token_probs`: count^-smoothing from the
    token counts at `path` (scripts/token_counts.py; --token_counts), 0 for the special tokens."""
    path = require_file(path, "--token_counts")
    counts = load_token_counts(path).astype(np.float64)
    if len(counts) != vocab_size:
        raise CliError(f"--token_counts {path} has {counts.size} entries but the vocabulary has {vocab_size}")
    probs = np.maximum(counts, 1) ** -smoothing
    for tid in special_ids.values():
        probs[tid] = 0.0
    return torch.from_numpy(probs).float()


def add_interchange_args(parser) -> None:
    """The --interchange_* flags: where DIITO intervenes (causal_train.py) and where IIA is measured (run_iia.py),
    drawn by `BatchPreparer` the same way in both."""
    a = parser.add_argument
    a("--interchange_prop", type=float, default=0.3,
      help="Interchanged positions per base/source pair: int(min(len_base, len_source) * prop).")
    a("--interchange_max_token", type=int, default=-1, help="Cap on interchanged positions per pair (-1: none).")
    a("--interchange_consecutive_only", action="store_true", help="Interchange one consecutive span per pair.")
    a("--interchange_masked_token_only", action="store_true",
      help="Choose base positions only among the masked tokens (masked LMs; causal_train.py: with --mlm).")


def interchange_problem(args) -> str | None:
    """What is wrong with the --interchange_* flags of `args`, or None (the same rule for training and IIA)."""
    if not 0.0 < args.interchange_prop <= 1.0:
        return f"--interchange_prop must lie in (0, 1], got {args.interchange_prop}"
    if not (args.interchange_max_token == -1 or args.interchange_max_token >= 1):
        return f"--interchange_max_token must be -1 (no cap) or >= 1, not {args.interchange_max_token}"
    return None
