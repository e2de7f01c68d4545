"""On-policy distillation for causal-LM students (GKD's lambda, `--on_policy_fraction`).

A share of the batches is replaced by the student's own text: each sequence's first tokens (the
prompt, from the corpus) continued by tokens the student samples. The teacher then scores these
sequences like any others, and the soft-target term (with a mapping, DIITO's term too, base and
source both sampled) trains on the sampled positions only; the LM loss has no ground truth there
and skips them.

Which batches, and every sampled token, follow from (--seed, epoch, the batch's place in the epoch,
rank): the same command gives the same samples, a resumed run draws what the uninterrupted run drew
(no random state to save), and every rank replaces the same micro-steps, so no rank waits for another.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

_SIDE = {"base": 0, "source": 1}


@dataclass(frozen=True)
class OnPolicy:
    """The sampling settings of a run (causal_train.py's --on_policy_* flags)."""

    fraction: float  # the share of micro-batches replaced by samples (0: off, 1: every one)
    prompt_tokens: int  # corpus tokens kept as the prompt (fewer when a sequence of the batch is shorter)
    new_tokens: int  # tokens sampled after the prompt (a sequence ends at the first EOS it samples)
    temperature: float
    top_k: int  # 0: the whole vocabulary
    seed: int
    eos_id: int
    pad_id: int
    max_len: int  # the longest sequence the models take

    def chosen(self, epoch: int, index: int) -> bool:
        """Whether micro-batch `index` of `epoch` is replaced by samples (the same answer on every rank)."""
        if self.fraction <= 0:
            return False
        if self.fraction >= 1:
            return True
        return bool(np.random.default_rng([self.seed, epoch, index, 7]).random() < self.fraction)

    @torch.no_grad()
    def sample_batch(self, model, batch: dict, epoch: int, index: int, rank: int, device, autocast) -> dict:
        """`batch` with each side's sequences replaced by a prompt and the student's continuation; adds
        `<side>_prompt_lengths`. `model` is the student itself (not a DDP wrapper), put in eval mode meanwhile."""
        was_training = model.training
        model.eval()
        try:
            out = dict(batch)
            for side in ("base", "source"):
                if f"{side}_ids" not in batch:
                    continue
                seed = [self.seed, epoch, index, rank, _SIDE[side]]
                ids, lengths, prompt = self._continue(model, batch[f"{side}_ids"], batch[f"{side}_lengths"], seed,
                                                      device, autocast)
                out[f"{side}_ids"], out[f"{side}_lengths"], out[f"{side}_prompt_lengths"] = ids, lengths, prompt
            return out
        finally:
            model.train(was_training)

    def _continue(self, model, ids: torch.Tensor, lengths: torch.Tensor, seed: list[int], device, autocast):
        """(sequences (B, P + n) on the CPU, their lengths, the prompt length P of each) for (B, L) `ids`."""
        prompt_len = max(1, min(self.prompt_tokens, int(lengths.min()) - 1, self.max_len - 1))
        n_new = min(self.new_tokens, self.max_len - prompt_len)
        generator = torch.Generator(device=device).manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
        tokens = ids[:, :prompt_len].to(device)
        inputs, cache, sampled = tokens, {}, []
        for _ in range(n_new):  # every step for every sequence: ranks and batches take the same number of forwards
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model(input_ids=inputs, use_cache=True, **cache)
            logits = out.logits[:, -1, :].float() / self.temperature
            if self.top_k:
                kth = torch.topk(logits, min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            inputs = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            cache = _next_cache(out)
            sampled.append(inputs)
        new = torch.cat(sampled, dim=1)
        is_eos = new == self.eos_id
        kept = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1,
                           torch.full_like(is_eos[:, 0], n_new, dtype=torch.long))
        sequences = torch.cat([tokens, new], dim=1)
        beyond = torch.arange(sequences.shape[1], device=device)[None, :] >= (prompt_len + kept)[:, None]
        sequences = sequences.masked_fill(beyond, self.pad_id)
        lengths = (prompt_len + kept).cpu()
        return sequences.to(ids.dtype).cpu(), lengths, torch.full_like(lengths, prompt_len)


def _next_cache(out) -> dict:
    """The keyword that hands the key/value cache of `out` to the next forward: `cache` in transformers >= 5.25,
    `past_key_values` before."""
    if "cache" in out:
        return {"cache": out["cache"]}
    return {"past_key_values": out.past_key_values}
