"""CausalDistiller: trains a student against a teacher with the standard and the DIITO objectives.

One training step on a base/source batch:
  teacher (no gradients)   base run -> logits, last hidden state
                           source run (stops at the deepest site) -> site activations
                           counterfactual run (base input, source activations at the sites)
  student (with gradients) the same three runs
  loss = sum of alpha_* x each loss of `losses.py`

By default the counterfactual run starts from the base run's activation at the lowest site
instead of recomputing the blocks below it: with dropout off this is the same computation, so the
same losses and gradients (`--no_shared_prefix` runs the three full forwards instead, for
checking). When both causal weights are 0 no source or counterfactual run happens at all.

The runs themselves are `interventions.model_outputs`; checkpoints are written and read by
`checkpoints.py`. What stays here: the data order, the step (micro-steps and the optimiser step),
logging, and when to checkpoint and stop.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from functools import partial
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from transformers import get_linear_schedule_with_warmup

import training_checkpoints
from batching import BatchPreparer, Prepared
from checkpoints import CheckpointWriter, check_fingerprint
from cpu_dropout import use_cpu_dropout
from grouped_batch_sampler import epoch_batches
from interventions import Needs, Outputs, model_outputs
from lm_seqs_dataset import collated_batches
from losses import (FORWARD_KL, Divergence, head_losses, hidden_cosine, lm_cross_entropy, logits_mse, soft_target_loss,
                    use_compiled_kernels)
from neuron_mapping import MappingEntry
from sharding import FsdpEngine
from stop_signals import StopSignals
from training_log import TrainingLog
from utils import CliError, logger, progress_bar


def needs_from_alphas(alphas: dict[str, float]) -> Needs:
    """Which outputs the losses of weight > 0 use."""
    return Needs(
        logits=any(alphas[k] > 0 for k in ("ce", "mlm", "clm", "mse")),
        hidden=alphas["cos"] > 0,
        cf_logits=alphas["causal_ce"] > 0,
        cf_hidden=alphas["causal_cos"] > 0,
        teacher_logits=alphas["ce"] > 0 or alphas["mse"] > 0,
    )


class StudentStep(nn.Module):
    """All of the student's runs of one step in a single forward, so DDP sees one forward per backward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batches, sites, needs: Needs, data_augment: bool, shared_prefix: bool):
        return [
            model_outputs(self.model, p, sites, needs, want_logits=needs.logits,
                          data_augment=data_augment, shared_prefix=shared_prefix)
            for p in batches
        ]


def compute_losses(
    s: Outputs, t: Outputs, p: Prepared, alphas: dict[str, float], temperature: float,
    divergences: tuple[Divergence, Divergence] = (FORWARD_KL, FORWARD_KL),
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every active loss (weight > 0) of one prepared batch; `divergences` are what `ce` and `causal_ce`
    measure between the softened distributions (--divergence, --causal_divergence).

    Returns (the value of each loss, the weighted total with gradients). The vocabulary-wide
    losses go through `head_losses` (no logits stored) unless `mse` needs the logits themselves.
    """
    ce_divergence, causal_divergence = divergences
    values, total = {}, 0.0
    lm_name = "mlm" if alphas["mlm"] > 0 else "clm" if alphas["clm"] > 0 else None
    if p.lm_rows.numel() == 0:  # no LM target in this batch (on-policy samples): no LM term either
        lm_name = None
    if alphas["mse"] > 0:  # the plain path: materialise the logits once
        s_logits, t_logits = s.logits(), t.logits()
        parts = {"mse": logits_mse(s_logits, t_logits)}
        if alphas["ce"] > 0:
            parts["ce"] = soft_target_loss(s_logits, t_logits, temperature, ce_divergence)
        if lm_name:
            parts[lm_name] = lm_cross_entropy(s_logits.index_select(0, p.lm_rows), p.lm_targets)
        for name, value in parts.items():
            total = total + alphas[name] * value
            values[name] = value.detach()
    elif alphas["ce"] > 0 or lm_name:
        head_total, ce, lm = head_losses(
            s.features, s.projection, t.features, t.projection, p.lm_rows, p.lm_targets, temperature,
            alphas["ce"], alphas[lm_name] if lm_name else 0.0, ce_divergence,
        )
        total = total + head_total
        if alphas["ce"] > 0:
            values["ce"] = ce
        if lm_name:
            values[lm_name] = lm
    if alphas["causal_ce"] > 0:
        head_total, ce, _ = head_losses(s.cf_features, s.projection, t.cf_features, t.projection, None, None,
                                        temperature, alphas["causal_ce"], 0.0, causal_divergence)
        total = total + head_total
        values["causal_ce"] = ce
    for name, (a, b) in (("cos", (s.hidden, t.hidden)), ("causal_cos", (s.cf_hidden, t.cf_hidden))):
        if alphas[name] > 0:
            value = hidden_cosine(a, b)
            total = total + alphas[name] * value
            values[name] = value.detach()
    return values, total


def configure_optimizer(student: nn.Module, params, total_steps: int):
    """AdamW over the student's trainable parameters (no weight decay on biases and norms) and its
    linear warm-up/decay schedule over `total_steps`. Returns (optimizer, scheduler)."""
    no_decay = ("bias", "LayerNorm.weight", "norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")  # norm: RMSNorms
    named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": params.weight_decay},
        {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    logger.info("student: %d parameters, %d trainable", sum(p.numel() for p in student.parameters()),
                sum(p.numel() for _, p in named))
    optimizer = torch.optim.AdamW(
        groups, lr=params.learning_rate, eps=params.adam_epsilon, betas=(0.9, 0.98),
        fused=params.device.type == "cuda" and not params.fsdp_cpu_offload,  # (offload: the step runs on the CPU)
    )
    warmup = math.ceil(total_steps * params.warmup_prop)
    return optimizer, get_linear_schedule_with_warmup(optimizer, warmup, max(total_steps, 1))


def batch_preparer(params, vocab_size: int, token_probs) -> BatchPreparer:
    """The masking, interchange and padding settings of causal_train.py's flags."""
    return BatchPreparer(
        mlm=params.mlm,
        vocab_size=vocab_size,
        mask_id=params.special_tok_ids.get("mask_token"),
        token_probs=token_probs,
        mlm_mask_prop=params.mlm_mask_prop,
        pred_probs=(params.word_mask, params.word_keep, params.word_rand),
        restrict_ce_to_mask=params.restrict_ce_to_mask,
        interchange_prop=params.interchange_prop,
        interchange_max_token=params.interchange_max_token,
        interchange_mode="consecutive" if params.interchange_consecutive_only else "random",
        masked_only=params.interchange_masked_token_only,
        pad_to_multiple_of=params.pad_to_multiple_of,
        max_width=params.max_model_input_size,
        pad_id=params.special_tok_ids.get("pad_token") or 0,
    )


def default_log_interval(total_steps: int) -> int:
    """500 steps, or fewer for a short run: about 50 log points over `total_steps` (at least every step)."""
    return max(1, min(500, total_steps // 50))


class NonFiniteLoss(RuntimeError):
    """A NaN or infinite loss beyond --skip_nonfinite_steps: the run stops with its last good state."""


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class CausalDistiller:
    """Owns the data order, the optimisation, logging and checkpoints of a distillation run.

    `params` is the run's `distill_config.DistillConfig` (flags, device and ranks, what the inputs gave).
    """

    def __init__(self, params, dataset, token_probs, student: nn.Module, teacher: nn.Module,
                 mappings: list[MappingEntry] | None):
        self.params = params
        self.dataset = dataset
        self.device = params.device
        self.is_master = params.is_master
        self.multi_gpu = params.multi_gpu
        self.dump_path = Path(params.dump_path)
        self.student = student
        self.teacher = teacher
        self.alphas = params.alphas
        self.needs = needs_from_alphas(self.alphas)
        self.temperature = params.temperature
        self.divergences = (params.soft_target_divergence, params.causal_soft_target_divergence)
        self.on_policy = params.on_policy
        self.mappings = mappings or []
        self.data_augment = params.data_augment
        self.shared_prefix = not params.no_shared_prefix
        self.include_crossway = params.include_crossway and self.needs.causal
        self.source_kd = params.source_kd and not self.needs.causal
        self.grad_acc = params.gradient_accumulation_steps

        self.preparer = batch_preparer(params, student.config.vocab_size, token_probs)
        self._site_cache: dict[tuple[int, str], dict[int, torch.Tensor]] = {}

        # Precision: one context, chosen once.
        self.amp_dtype = params.amp_dtype
        if self.amp_dtype is None:
            self.autocast = contextlib.nullcontext
        else:
            self.autocast = partial(torch.autocast, device_type=self.device.type, dtype=self.amp_dtype)
            self.teacher.to(self.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=bool(params.fp16))
        use_compiled_kernels(params.compile)  # (a process-wide switch: set, or reset)
        # On the CPU the student's dropout runs through cpu_dropout.py: the same functions, in less
        # time and memory (stock model classes and parameters; the saved config is unchanged).
        if self.device.type == "cpu":
            logger.info("student dropout on the CPU through cpu_dropout.py: %s", use_cpu_dropout(student))

        # Optimiser and schedule.
        self.batches_per_epoch = len(self.epoch_batches(0))
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.grad_acc)
        self.total_steps = steps_per_epoch * params.n_epoch
        if params.max_steps > 0:
            self.total_steps = min(self.total_steps, params.max_steps)
        # --fsdp: the models are sharded before the optimizer is made (it holds the shards).
        self.fsdp = None
        if params.fsdp:
            self.fsdp = FsdpEngine(params, student, teacher, compute_losses)
        self.optimizer, self.scheduler = configure_optimizer(student, params, self.total_steps)
        # Logging never changes the numbers (a host sync and a read of the summed losses), only how often.
        self.log_interval = params.log_interval or default_log_interval(self.total_steps)

        self.step_module: nn.Module = StudentStep(student)
        if self.fsdp is not None:
            self.step_module = self.fsdp.student_step
        elif self.multi_gpu:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.step_module = DistributedDataParallel(
                self.step_module, device_ids=device_ids, find_unused_parameters=not self.needs.logits,
            )

        # Counters (a checkpoint restores them).
        self.epoch = 0
        self.n_step = 0  # optimiser steps
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.n_skipped_nonfinite = 0
        self.n_tokens = 0
        self.stops = StopSignals()
        self.forward_counts = {"teacher": {}, "student": {}}
        self.checkpoints = CheckpointWriter(self.dump_path, params.save_total_limit)
        self.last_checkpoint_step: int | None = None
        self.on_checkpoint = None  # called with each checkpoint written (causal_train: finish a --force)
        self.log = TrainingLog(params, self.dump_path)  # opened by train(): building a distiller writes nothing

    # --- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        """Train for the steps asked for (from a loaded checkpoint's position, if any), then save the student.

        Writes a checkpoint every --checkpoint_interval steps, at each epoch's end and at the end;
        on SIGTERM/SIGINT it finishes the current step, writes one and raises `Preempted`.
        """
        self.stops.install()
        try:
            self._train()
        finally:
            self.stops.restore()

    def _train(self) -> None:
        p = self.params
        self.student.train()
        self.teacher.eval()
        if self.is_master:
            self.log.open()
            logger.info("training for %d optimiser steps (%d batches per epoch, %d epochs, accumulation %d), "
                        "logging every %d", self.total_steps, self.batches_per_epoch, p.n_epoch, self.grad_acc,
                        self.log_interval)
        bar = progress_bar(total=self.total_steps, initial=self.n_step, disable=not self.is_master or p.no_progress,
                   desc="distilling", dynamic_ncols=True)
        log_sums: dict[str, torch.Tensor] = {}
        n_log: dict[str, int] = {}  # steps that had each term (on-policy samples have no LM loss)
        self.last_log = time.time()
        tokens_at_log = self.n_tokens
        done = self.n_step >= self.total_steps
        try:
            while self.epoch < p.n_epoch and not done:
                check_fingerprint(p.data_file, p.data_fingerprint)
                self.dataset.set_epoch(self.epoch)
                batches = self.epoch_batches(self.epoch)
                for window in self._windows(batches[self.batch_in_epoch:]):
                    self.batch_in_epoch += len(window)
                    losses = self.step(window)  # None: a non-finite step, skipped
                    bar.update(0 if losses is None else 1)
                    if losses is not None:
                        for k, v in losses.items():
                            log_sums[k] = log_sums.get(k, 0.0) + v
                            n_log[k] = n_log.get(k, 0) + 1
                        if self.n_step % self.log_interval == 0:
                            self._log(log_sums, n_log, tokens_at_log, bar)
                            log_sums, n_log, tokens_at_log = {}, {}, self.n_tokens
                        if p.checkpoint_interval > 0 and self.n_step % p.checkpoint_interval == 0:
                            self.save_checkpoint()
                        if p.snapshot_interval > 0 and self.n_step % p.snapshot_interval == 0:
                            training_checkpoints.save_snapshot(self)
                    if self.n_step >= self.total_steps:
                        done = True
                        break
                    if self.stops.agreed(self.multi_gpu, self.device):
                        if self.last_checkpoint_step != self.n_step:  # (not twice when this step just wrote one)
                            self.save_checkpoint()
                        raise Preempted(self.stops.signum)
                if not done or self.batch_in_epoch >= len(batches):
                    self.epoch += 1
                    self.batch_in_epoch = 0
                    if self.is_master:
                        logger.info("epoch %d done (step %d)", self.epoch, self.n_step)
                    self.save_checkpoint()
        except NonFiniteLoss:
            bar.close()
            raise
        bar.close()
        if n_log:
            self._log(log_sums, n_log, tokens_at_log, None)
        if self.last_checkpoint_step != self.n_step:  # a finished run can be extended with --resume
            self.save_checkpoint()
        self.save_final()

    # --- one step ------------------------------------------------------------------------------
    def step(self, window: list[dict]) -> dict[str, torch.Tensor] | None:
        """One optimiser step on `window`, a list of collated batches (gradient accumulation).

        Each batch is one micro-step (forward and backward, its loss divided by
        --gradient_accumulation_steps); gradients are synchronised across ranks on the last one
        only. Returns the loss values summed over the window the same way (each detached, plus
        `loss`, the weighted total), or None when the step was skipped for a non-finite loss.
        """
        losses: dict[str, torch.Tensor] = {}
        if self.on_policy is not None:  # (the window's first batch: its place in this epoch's batches)
            first = max(self.batch_in_epoch - len(window), 0)
            window = [self._on_policy_batch(batch, first + i) for i, batch in enumerate(window)]
        present: dict[str, int] = {}
        for micro_step, batch in enumerate(window):
            sync = micro_step == len(window) - 1
            for k, v in self._micro_step(batch, sync).items():
                losses[k] = losses.get(k, 0.0) + v / self.grad_acc
                present[k] = present.get(k, 0) + 1
        for k, n in present.items():  # a term some micro-batches lack (the LM loss of on-policy samples)
            if n < len(window):
                losses[k] = losses[k] * (len(window) / n)
        if not self._optimizer_step(losses):
            return None
        self.n_step += 1
        return losses

    def _on_policy_batch(self, batch: dict, index: int) -> dict:
        """`batch`, or (when --on_policy_fraction picks it) the student's continuations of its prompts."""
        if not self.on_policy.chosen(self.epoch, index):
            return batch
        return self.on_policy.sample_batch(self.student, batch, self.epoch, index, self.params.global_rank,
                                           self.device, self.autocast)

    def losses_for_batch(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward every run of one collated batch; return (each active loss's value, weighted total).

        With --include_crossway the reversed pair is added and each loss is the mean of both; so are the source
        sequences with --source_kd (standard losses only).
        """
        prepared = self._prepare(batch)
        t_sites, s_sites = self._draw_sites()
        if self.fsdp is not None:
            return self._sharded_losses(prepared, t_sites, s_sites)
        with self.autocast():
            with torch.inference_mode():
                t_outs = [
                    model_outputs(self.teacher, p, t_sites, self.needs, want_logits=self.needs.teacher_logits,
                                  data_augment=self.data_augment, shared_prefix=self.shared_prefix)
                    for p in prepared
                ]
            t_outs = [_usable_outside_inference(o) for o in t_outs]
            s_outs = self.step_module(prepared, s_sites, self.needs, self.data_augment, self.shared_prefix)
            per_pair = [compute_losses(s, t, p, self.alphas, self.temperature, self.divergences)
                        for s, t, p in zip(s_outs, t_outs, prepared)]
        return self._mean_losses(prepared, t_outs, s_outs, per_pair)

    def _sharded_losses(self, prepared: list[Prepared], t_sites, s_sites):
        """`losses_for_batch` under --fsdp: the same runs and losses, the student's losses inside its FSDP root."""
        with self.autocast():
            with self.fsdp.teacher_mode():
                t_outs = self.fsdp.teacher_outputs(self.teacher, prepared, t_sites, self.needs, self.data_augment,
                                                   self.shared_prefix)
            t_outs = [_usable_outside_inference(o) for o in t_outs]
            s_outs, per_pair = self.fsdp.student_losses(prepared, s_sites, self.needs, self.data_augment,
                                                        self.shared_prefix, t_outs, self.alphas, self.temperature,
                                                        self.divergences)
        return self._mean_losses(prepared, t_outs, s_outs, per_pair)

    def _mean_losses(self, prepared, t_outs, s_outs, per_pair):
        """(each loss averaged over the prepared batches, the total); counts the runs."""
        self._count(prepared, t_outs, s_outs)
        values = {name: sum(v[name] for v, _ in per_pair) / len(per_pair) for name in per_pair[0][0]}
        total = sum(t for _, t in per_pair) / len(per_pair)
        return values, total

    def _prepare(self, batch: dict) -> list[Prepared]:
        """The batch masked and with its interchange positions (and reversed, with --include_crossway; its sources
        as a batch of their own, with --source_kd), on the device."""
        prepared = [self.preparer.prepare(batch, causal=self.needs.causal)]
        if self.include_crossway or self.source_kd:
            prepared.append(self.preparer.prepare(batch, causal=self.needs.causal, reverse=True))
        return [p.to(self.device) for p in prepared]

    def _draw_sites(self) -> tuple[dict[int, torch.Tensor] | None, dict[int, torch.Tensor] | None]:
        """(teacher sites, student sites) of a mapping entry drawn at random; (None, None) without a causal loss."""
        if not self.needs.causal:
            return None, None
        entry = random.choice(self.mappings)
        if self.fsdp is not None:  # every rank must run the same blocks (their all-gathers are collectives)
            entry = self.mappings[self.fsdp.same_entry(self.mappings.index(entry))]
        return self._sites(entry, "teacher"), self._sites(entry, "student")

    def _sites(self, entry: MappingEntry, side: str) -> dict[int, torch.Tensor]:
        key = (entry.index, side)
        if key not in self._site_cache:
            sites = entry.teacher if side == "teacher" else entry.student
            self._site_cache[key] = {
                layer: torch.tensor(dims, dtype=torch.long, device=self.device) for layer, dims in sites.items()
            }
        return self._site_cache[key]

    def _count(self, prepared: list[Prepared], t_outs: list[Outputs], s_outs: list[Outputs]) -> None:
        """Forward runs per model (for tests and the bench) and real tokens seen (for the speed log)."""
        for who, outs in (("teacher", t_outs), ("student", s_outs)):
            for o in outs:
                for run, n in o.forwards.items():
                    self.forward_counts[who][run] = self.forward_counts[who].get(run, 0) + n
        self.n_tokens += sum(p.n_real_tokens for p in prepared)

    def _micro_step(self, batch: dict, sync: bool) -> dict[str, torch.Tensor]:
        # (--fsdp reduce-scatters at every micro-step: a rank keeps only its shard of the gradient)
        no_sync = self.step_module.no_sync if (self.multi_gpu and not sync and self.fsdp is None) else \
            contextlib.nullcontext
        try:
            with no_sync():
                losses, total = self.losses_for_batch(batch)
                self.scaler.scale(total / self.grad_acc).backward()
        except torch.OutOfMemoryError:
            shape = tuple(batch["base_ids"].shape)
            raise CliError(
                f"out of memory at step {self.n_step + 1} on a batch of shape {shape} (sequences x tokens); "
                f"lower --batch_size (now {self.params.batch_size}) and raise --gradient_accumulation_steps "
                f"(now {self.grad_acc}) to keep the effective batch, or use --bf16"
            ) from None
        losses = {k: v.detach() for k, v in losses.items()}
        losses["loss"] = total.detach()
        return losses

    def _optimizer_step(self, window: dict[str, torch.Tensor]) -> bool:
        """Clip, step, schedule. Returns False when the step was dropped for a non-finite loss."""
        finite = torch.isfinite(window["loss"])
        if self.multi_gpu:
            flag = finite.float().reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            finite = flag[0] > 0
        if not bool(finite):  # one host sync per optimiser step: a bad step must never update the weights
            bad = [k for k, v in window.items() if k != "loss" and not torch.isfinite(v)]
            # (the grad scaler is left as it is: nothing was unscaled, and its update() would refuse a
            # step without inf checks; a non-finite loss is not a gradient overflow it could back off from)
            self.optimizer.zero_grad(set_to_none=True)
            if self.n_skipped_nonfinite < self.params.skip_nonfinite_steps:
                self.n_skipped_nonfinite += 1
                logger.warning("step %d: non-finite loss (%s); step skipped (%d/%d skips used)", self.n_step + 1,
                               ", ".join(bad) or "loss", self.n_skipped_nonfinite, self.params.skip_nonfinite_steps)
                return False
            raise NonFiniteLoss(
                f"step {self.n_step + 1}: non-finite loss in {', '.join(bad) or 'loss'}; "
                f"stopping with the last good state (allow skips with --skip_nonfinite_steps N)"
            )
        self.scaler.unscale_(self.optimizer)
        if self.params.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.params.max_grad_norm)
        scale_before = self.scaler.get_scale() if self.params.fp16 else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.params.fp16 and self.scaler.get_scale() < scale_before:
            logger.info("step %d: fp16 overflow, the grad scaler skipped this update (normal)", self.n_step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # --- data ----------------------------------------------------------------------------------
    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch` (item indices), in order; the same on every call."""
        p = self.params
        return epoch_batches(self.dataset, epoch, batch_size=p.batch_size, seed=p.seed, group_by_size=p.group_by_size,
                             max_len=p.max_model_input_size, world_size=p.world_size if self.multi_gpu else 1,
                             rank=p.global_rank)

    def collated(self, batches: list[list[int]]) -> Iterator[dict[str, torch.Tensor]]:
        """The collated `batches`, in order, through --num_workers DataLoader workers."""
        return collated_batches(self.dataset, batches, num_workers=self.params.num_workers,
                                seed=self.params.seed + self.epoch, stopping=lambda: self.stops.signum is not None)

    def _windows(self, batches: list[list[int]]) -> Iterator[list[dict[str, torch.Tensor]]]:
        """The collated `batches` in windows of --gradient_accumulation_steps (the last may be shorter)."""
        collated = self.collated(batches)
        for start in range(0, len(batches), self.grad_acc):
            yield [next(collated) for _ in range(min(self.grad_acc, len(batches) - start))]

    # --- logging -------------------------------------------------------------------------------
    def _log(self, sums: dict[str, torch.Tensor], counts: dict[str, int], tokens_at_log: int, bar) -> None:
        now = time.time()
        values = {k: float(v) / counts[k] for k, v in sums.items()}  # the host sync of a log interval
        tok_s = (self.n_tokens - tokens_at_log) / max(now - self.last_log, 1e-9)
        self.last_log = now
        if self.is_master:
            self.log.write(self.n_step, values, self.scheduler.get_last_lr()[0], tok_s, self.n_skipped_nonfinite, bar)

    # --- checkpoints (training_checkpoints.py) -------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """Write `checkpoint-<step>/` (every rank takes part); returns the folder on the master, None elsewhere."""
        return training_checkpoints.save(self)

    def load_checkpoint(self, folder: Path) -> None:
        """Continue from a checkpoint: weights, optimiser, data position, RNG (CliError when it does not fit)."""
        training_checkpoints.load(self, folder)

    def save_final(self) -> None:
        """The student as a plain HF model folder at --dump_path (consolidated under --fsdp)."""
        training_checkpoints.save_final(self)


def _usable_outside_inference(o: Outputs) -> Outputs:
    """Teacher tensors saved by a loss's backward must be normal tensors, not inference tensors.

    Only the cosine losses save the teacher's tensors; the head losses use the teacher's features
    without saving them, so those are not copied."""
    for name in ("hidden", "cf_hidden"):
        value = getattr(o, name)
        if value is not None:
            setattr(o, name, value.clone())
    return o
