"""CausalDistiller: trains a student against a teacher with the standard and the DIITO objectives.

One training step on a base/source batch:
  teacher (no gradients)   base run -> logits, last hidden state
                           source run (stops at the deepest site) -> site activations
                           counterfactual run (base input, source activations at the sites)
  student (with gradients) the same three runs
  loss = sum of alpha_* x each loss of `losses.py`

With `--shared_prefix` (the default) the counterfactual run starts from the base run's activation
at the lowest site instead of recomputing the blocks below it: with dropout off this is the same
computation, so the same losses and gradients. When both causal weights are 0 no source or
counterfactual run happens at all.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm
from transformers import get_linear_schedule_with_warmup

from batching import BatchPreparer, Prepared
from checkpoints import (  # noqa: F401 -- list_checkpoints, checkpoint_problem, ... are re-exported
    CHECKPOINT_PREFIX, STATE_FILE, check_fingerprint, checkpoint_problem, file_fingerprint, find_resume_checkpoint,
    folder_size, list_checkpoints, save_training_state, write_manifest)
from cpu_dropout import use_cpu_dropout
from grouped_batch_sampler import GroupedBatchSampler, create_lengths_groups
from interventions import head_features, head_projection, interchange, run_model
from lm_seqs_dataset import ignore_stop_signals, stop_signals_blocked
from losses import head_losses, hidden_cosine, lm_cross_entropy, logits_mse, soft_target_kl, use_compiled_kernels
from neuron_mapping import MappingEntry
from utils import CliError, atomic_dir, is_disk_full, logger

LOSS_NAMES = ("ce", "mlm", "clm", "mse", "cos", "causal_ce", "causal_cos")


@dataclass
class Needs:
    """Which outputs the active losses use, so nothing else is computed."""

    logits: bool
    hidden: bool
    cf_logits: bool
    cf_hidden: bool
    teacher_logits: bool

    @property
    def causal(self) -> bool:
        return self.cf_logits or self.cf_hidden


def needs_from_alphas(alphas: dict[str, float]) -> Needs:
    return Needs(
        logits=any(alphas[k] > 0 for k in ("ce", "mlm", "clm", "mse")),
        hidden=alphas["cos"] > 0,
        cf_logits=alphas["causal_ce"] > 0,
        cf_hidden=alphas["causal_cos"] > 0,
        teacher_logits=alphas["ce"] > 0 or alphas["mse"] > 0,
    )


@dataclass
class Outputs:
    """What one model produced for one prepared batch, gathered at the selected rows.

    The LM head is applied up to its vocabulary projection only: the losses project chunk by
    chunk (`losses.head_losses`), so no (rows x vocabulary) logits are kept.
    """

    projection: nn.Linear | None = None  # the vocabulary projection of the model's LM head
    features: torch.Tensor | None = None  # (N, H) head features at logit_idx
    hidden: torch.Tensor | None = None  # (R, H) last hidden states at real_idx
    cf_features: torch.Tensor | None = None
    cf_hidden: torch.Tensor | None = None
    forwards: dict = field(default_factory=dict)  # run name -> count (for tests and logs)

    def logits(self, counterfactual: bool = False) -> torch.Tensor:
        """Materialised (N, V) logits (only the `mse` loss needs them)."""
        return self.projection(self.cf_features if counterfactual else self.features)


def model_outputs(
    model: nn.Module,
    p: Prepared,
    sites: dict[int, torch.Tensor] | None,
    needs: Needs,
    *,
    want_logits: bool,
    data_augment: bool = False,
    shared_prefix: bool = True,
) -> Outputs:
    """Run base, and when `sites` is given, source and counterfactual runs of `model` on `p`.

    sites: block -> (D,) dims tensor of this model's variables for the step's mapping entry.
    """
    out = Outputs(projection=head_projection(model))
    causal = sites is not None and needs.causal
    layers = sorted(sites) if causal else []
    prefix = causal and shared_prefix and not data_augment
    base_last, base_sites = run_model(model, p.input_ids, p.attention_mask, capture=(layers[0],) if prefix else ())
    out.forwards["base"] = 1
    hidden_size = base_last.shape[-1]
    flat = base_last.reshape(-1, hidden_size)
    if want_logits:
        out.features = head_features(model, flat.index_select(0, p.logit_idx))
    if needs.hidden:
        out.hidden = flat.index_select(0, p.real_idx)
    if not causal:
        return out

    if data_augment:
        tokens = p.source_ids[p.batch_idx, p.source_pos]
        cf_ids = p.input_ids.index_put((p.batch_idx, p.base_pos), tokens)
        cf_last, _ = run_model(model, cf_ids, p.attention_mask)
    else:
        _, source_sites = run_model(
            model, p.source_ids, p.source_mask, capture=tuple(layers),
            stop_after=layers[-1] if shared_prefix else None,
        )
        out.forwards["source"] = 1
        write = {
            layer: partial(
                interchange, source=source_sites[layer], dims=sites[layer],
                batch_idx=p.batch_idx, base_pos=p.base_pos, source_pos=p.source_pos,
            )
            for layer in layers
        }
        if prefix:
            lowest = layers[0]
            start = (lowest, write[lowest](base_sites[lowest]))
            upper = {layer: fn for layer, fn in write.items() if layer != lowest}
            cf_last, _ = run_model(model, p.input_ids, p.attention_mask, writes=upper, start_after=start)
        else:
            cf_last, _ = run_model(model, p.input_ids, p.attention_mask, writes=write)
    out.forwards["counterfactual"] = 1
    cf_flat = cf_last.reshape(-1, hidden_size)
    if needs.cf_logits:
        out.cf_features = head_features(model, cf_flat.index_select(0, p.logit_idx))
    if needs.cf_hidden:
        out.cf_hidden = cf_flat.index_select(0, p.real_idx)
    return out


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
    s: Outputs, t: Outputs, p: Prepared, alphas: dict[str, float], temperature: float
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every active loss (weight > 0) of one prepared batch.

    Returns (the value of each loss, the weighted total with gradients). The vocabulary-wide
    losses go through `head_losses` (no logits stored) unless `mse` needs the logits themselves.
    """
    values, total = {}, 0.0
    lm_name = "mlm" if alphas["mlm"] > 0 else "clm" if alphas["clm"] > 0 else None
    if alphas["mse"] > 0:  # the plain path: materialise the logits once
        s_logits, t_logits = s.logits(), t.logits()
        parts = {"mse": logits_mse(s_logits, t_logits)}
        if alphas["ce"] > 0:
            parts["ce"] = soft_target_kl(s_logits, t_logits, temperature)
        if lm_name:
            parts[lm_name] = lm_cross_entropy(s_logits.index_select(0, p.lm_rows), p.lm_targets)
        for name, value in parts.items():
            total = total + alphas[name] * value
            values[name] = value.detach()
    elif alphas["ce"] > 0 or lm_name:
        head_total, ce, lm = head_losses(
            s.features, s.projection, t.features, t.projection, p.lm_rows, p.lm_targets, temperature,
            alphas["ce"], alphas[lm_name] if lm_name else 0.0,
        )
        total = total + head_total
        if alphas["ce"] > 0:
            values["ce"] = ce
        if lm_name:
            values[lm_name] = lm
    if alphas["causal_ce"] > 0:
        head_total, ce, _ = head_losses(s.cf_features, s.projection, t.cf_features, t.projection, None, None,
                                        temperature, alphas["causal_ce"], 0.0)
        total = total + head_total
        values["causal_ce"] = ce
    for name, (a, b) in (("cos", (s.hidden, t.hidden)), ("causal_cos", (s.cf_hidden, t.cf_hidden))):
        if alphas[name] > 0:
            value = hidden_cosine(a, b)
            total = total + alphas[name] * value
            values[name] = value.detach()
    return values, total


class NonFiniteLoss(RuntimeError):
    pass


class CausalDistiller:
    """Owns the data order, the optimisation, logging and checkpoints of a distillation run."""

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
        self.alphas = {name: float(getattr(params, f"alpha_{name}")) for name in LOSS_NAMES}
        self.needs = needs_from_alphas(self.alphas)
        self.temperature = params.temperature
        self.mappings = mappings or []
        if self.needs.causal and not self.mappings:
            raise CliError("a causal objective (--alpha_causal_ce/--alpha_causal_cos > 0) needs --neuron_mapping")
        self.data_augment = params.data_augment
        self.shared_prefix = not params.no_shared_prefix
        self.include_crossway = params.include_crossway and self.needs.causal
        self.grad_acc = params.gradient_accumulation_steps

        self.preparer = BatchPreparer(
            mlm=params.mlm,
            vocab_size=student.config.vocab_size,
            mask_id=params.special_tok_ids.get("mask_token"),
            token_probs=token_probs,
            mlm_mask_prop=params.mlm_mask_prop,
            pred_probs=(params.word_mask, params.word_keep, params.word_rand),
            restrict_ce_to_mask=params.restrict_ce_to_mask,
            interchange_prop=params.interchange_prop,
            interchange_max_token=params.interchange_max_token,
            interchange_mode="consecutive" if params.interchange_consecutive_only else "random",
            masked_only=params.interchange_masked_token_only,
            pad_to_multiple_of=getattr(params, "pad_to_multiple_of", None) or 1,
            max_width=params.max_model_input_size,
            pad_id=params.special_tok_ids.get("pad_token") or 0,
        )
        self._site_cache: dict[tuple[int, str], dict[int, torch.Tensor]] = {}

        # Precision: one context, chosen once.
        self.amp_dtype = torch.bfloat16 if params.bf16 else torch.float16 if params.fp16 else None
        if self.amp_dtype is None:
            self.autocast = contextlib.nullcontext
        else:
            self.autocast = partial(torch.autocast, device_type=self.device.type, dtype=self.amp_dtype)
            self.teacher.to(self.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=bool(params.fp16))
        use_compiled_kernels(bool(getattr(params, "compile", False)))  # (a process-wide switch: set, or reset)
        # On the CPU the student's dropout runs through cpu_dropout.py: the same functions, in less
        # time and memory (stock model classes and parameters; the saved config is unchanged).
        if self.device.type == "cpu":
            logger.info("student dropout on the CPU through cpu_dropout.py: %s", use_cpu_dropout(student))

        # Optimiser and schedule.
        self.batches_per_epoch = self._count_batches()
        steps_per_epoch = math.ceil(self.batches_per_epoch / self.grad_acc)
        self.total_steps = steps_per_epoch * params.n_epoch
        if params.max_steps > 0:
            self.total_steps = min(self.total_steps, params.max_steps)
        no_decay = ("bias", "LayerNorm.weight", "norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")  # norm: RMSNorms
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not any(nd in n for nd in no_decay)], "weight_decay": params.weight_decay},
            {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
        ]
        logger.info("student: %d parameters, %d trainable", sum(p.numel() for p in student.parameters()),
                    sum(p.numel() for _, p in named))
        self.optimizer = torch.optim.AdamW(
            groups, lr=params.learning_rate, eps=params.adam_epsilon, betas=(0.9, 0.98),
            fused=self.device.type == "cuda",
        )
        warmup = math.ceil(self.total_steps * params.warmup_prop)
        self.scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup, max(self.total_steps, 1))

        self.step_module: nn.Module = StudentStep(student)
        if self.multi_gpu:
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
        self._stop_signal = None
        self.forward_counts = {"teacher": {}, "student": {}}
        self.last_checkpoint_step: int | None = None
        self.on_checkpoint = None  # called with each checkpoint written (causal_train: finish a --force)
        self.tb = None  # opened by train(): building a distiller writes nothing

    def _open_loggers(self) -> None:
        if not self.is_master or self.tb is not None:
            return
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(log_dir=str(self.dump_path / "log" / "train"), flush_secs=30)
        if self.params.is_wandb:
            import wandb

            wandb.init(project="causal-distill", name=self.params.run_name, config=vars(self.params))

    # --- data ----------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order; the same on every call (seeded by seed and epoch)."""
        p = self.params
        if self.multi_gpu:
            sampler = DistributedSampler(self.dataset, num_replicas=p.world_size, rank=p.global_rank,
                                         shuffle=True, seed=p.seed, drop_last=True)
            sampler.set_epoch(epoch)
        else:
            gen = torch.Generator().manual_seed(p.seed * 1000003 + epoch)
            sampler = RandomSampler(self.dataset, generator=gen)
        if p.group_by_size:
            groups = create_lengths_groups(lengths=self.dataset.lengths, k=p.max_model_input_size)
            batch_sampler = GroupedBatchSampler(sampler=sampler, group_ids=groups, batch_size=p.batch_size)
        else:
            batch_sampler = BatchSampler(sampler, batch_size=p.batch_size, drop_last=False)
        batches = list(batch_sampler)
        if self.multi_gpu:  # every rank must run the same number of steps
            n = torch.tensor([len(batches)])
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            batches = batches[: int(n)]
        return batches

    def _count_batches(self) -> int:
        return len(self._epoch_batches(0))

    def _loader(self, batches: list[list[int]]) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=self.dataset.batch_sequences,
            num_workers=self.params.num_workers,
            persistent_workers=False,
            # Its own generator: creating an iterator must not draw from the global RNG, or a
            # resumed run would see different masks and positions than the run that never stopped.
            generator=torch.Generator().manual_seed(self.params.seed + self.epoch),
            # The main process owns the shutdown: a SIGTERM to the whole process group (Slurm,
            # Kubernetes, docker stop) must not kill the workers before the stop checkpoint.
            worker_init_fn=ignore_stop_signals if self.params.num_workers > 0 else None,
        )

    def _iter_batches(self, batches: list[list[int]]):
        """Yield the collated `batches` in order, through DataLoader workers.

        Workers ignore SIGINT/SIGTERM and are started with those signals blocked (so none can
        arrive before a worker has set that up). Should a worker die anyway while the run is
        stopping, the remaining batches are collated in this process (collation draws no random
        numbers, so the data are the same) and the stop checkpoint is still written.
        """
        n_done = 0
        try:
            with stop_signals_blocked():  # the workers are forked here and inherit the blocked mask
                iterator = iter(self._loader(batches))
            for batch in iterator:
                n_done += 1
                yield batch
        except RuntimeError as err:
            if self._stop_signal is None or "DataLoader worker" not in str(err):
                raise
            logger.warning("a DataLoader worker died while stopping (%s); collating the rest in this process", err)
            for indices in batches[n_done:]:
                yield self.dataset.batch_sequences([self.dataset[i] for i in indices])

    def _sites(self, entry: MappingEntry, side: str) -> dict[int, torch.Tensor]:
        key = (entry.index, side)
        if key not in self._site_cache:
            sites = entry.teacher if side == "teacher" else entry.student
            self._site_cache[key] = {
                layer: torch.tensor(dims, dtype=torch.long, device=self.device) for layer, dims in sites.items()
            }
        return self._site_cache[key]

    # --- one step ------------------------------------------------------------------------------
    def losses_for_batch(self, batch: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Forward every run of one collated batch; return (each active loss's value, weighted total).

        With --include_crossway the reversed pair is added and each loss is the mean of both.
        """
        causal = self.needs.causal
        prepared = [self.preparer.prepare(batch, causal=causal)]
        if self.include_crossway:
            prepared.append(self.preparer.prepare(batch, causal=True, reverse=True))
        prepared = [p.to(self.device) for p in prepared]
        entry = random.choice(self.mappings) if causal else None
        t_sites = self._sites(entry, "teacher") if entry else None
        s_sites = self._sites(entry, "student") if entry else None
        with self.autocast():
            with torch.inference_mode():
                t_outs = [
                    model_outputs(self.teacher, p, t_sites, self.needs, want_logits=self.needs.teacher_logits,
                                  data_augment=self.data_augment, shared_prefix=self.shared_prefix)
                    for p in prepared
                ]
            t_outs = [_usable_outside_inference(o) for o in t_outs]
            s_outs = self.step_module(prepared, s_sites, self.needs, self.data_augment, self.shared_prefix)
            per_pair = [compute_losses(s, t, p, self.alphas, self.temperature) for s, t, p in zip(s_outs, t_outs, prepared)]
        for who, outs in (("teacher", t_outs), ("student", s_outs)):
            for o in outs:
                for run, n in o.forwards.items():
                    self.forward_counts[who][run] = self.forward_counts[who].get(run, 0) + n
        self.n_tokens += sum(p.n_real_tokens for p in prepared)
        values = {name: sum(v[name] for v, _ in per_pair) / len(per_pair) for name in per_pair[0][0]}
        total = sum(t for _, t in per_pair) / len(per_pair)
        return values, total

    def _micro_step(self, batch: dict, sync: bool) -> dict[str, torch.Tensor]:
        no_sync = self.step_module.no_sync if (self.multi_gpu and not sync) else contextlib.nullcontext
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

    # --- the loop ------------------------------------------------------------------------------
    def train(self) -> None:
        p = self.params
        self.student.train()
        self.teacher.eval()
        self._install_signal_handlers()
        self._open_loggers()
        if self.is_master:
            logger.info("training for %d optimiser steps (%d batches per epoch, %d epochs, accumulation %d)",
                        self.total_steps, self.batches_per_epoch, p.n_epoch, self.grad_acc)
        bar = tqdm(total=self.total_steps, initial=self.n_step, disable=not self.is_master or p.no_progress,
                   desc="distilling", dynamic_ncols=True)
        window: dict[str, torch.Tensor] = {}
        log_sums: dict[str, torch.Tensor] = {}
        n_log = 0
        self.last_log = time.time()
        tokens_at_log = self.n_tokens
        done = self.n_step >= self.total_steps
        try:
            while self.epoch < p.n_epoch and not done:
                check_fingerprint(p.data_file, getattr(p, "data_fingerprint", None))
                self.dataset.set_epoch(self.epoch)
                batches = self._epoch_batches(self.epoch)
                remaining = batches[self.batch_in_epoch:]
                n_micro = 0
                for batch in self._iter_batches(remaining):
                    n_micro += 1
                    sync = n_micro % self.grad_acc == 0 or self.batch_in_epoch + 1 == len(batches)
                    losses = self._micro_step(batch, sync)
                    self.batch_in_epoch += 1
                    for k, v in losses.items():
                        window[k] = window.get(k, 0.0) + v / self.grad_acc
                    if not sync:
                        continue
                    stepped = self._optimizer_step(window)
                    if stepped:
                        self.n_step += 1
                        for k, v in window.items():
                            log_sums[k] = log_sums.get(k, 0.0) + v
                        n_log += 1
                    window = {}
                    n_micro = 0
                    bar.update(1 if stepped else 0)
                    if stepped and self.n_step % p.log_interval == 0:
                        self._log(log_sums, n_log, tokens_at_log, bar)
                        log_sums, n_log, tokens_at_log = {}, 0, self.n_tokens
                    if stepped and p.checkpoint_interval > 0 and self.n_step % p.checkpoint_interval == 0:
                        self.save_checkpoint()
                    if self.n_step >= self.total_steps:
                        done = True
                        break
                    if self._should_stop():
                        self.save_checkpoint()
                        raise Preempted(self._stop_signal)
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

    # --- signals -------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            if self._stop_signal is None:
                logger.warning("received %s: finishing the current step, then writing a checkpoint",
                               signal.Signals(signum).name)
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not in the main thread
                signal.signal(sig, handler)

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop_signal is not None else 0.0])
        if self.multi_gpu:  # every rank stops at the same step
            flag = flag.to(self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # --- logging -------------------------------------------------------------------------------
    def _log(self, sums, n, tokens_at_log, bar) -> None:
        now = time.time()
        values = {k: float(v) / max(n, 1) for k, v in sums.items()}  # the host sync of a log interval
        elapsed = max(now - self.last_log, 1e-9)
        tok_s = (self.n_tokens - tokens_at_log) / elapsed
        self.last_log = now
        if not self.is_master:
            return
        lr = self.scheduler.get_last_lr()[0]
        for k, v in values.items():
            self.tb.add_scalar(f"losses/{k}", v, self.n_step)
        self.tb.add_scalar("learning_rate/lr", lr, self.n_step)
        self.tb.add_scalar("speed/real_tokens_per_s", tok_s * self.params.world_size, self.n_step)
        self.tb.add_scalar("memory/rss_gib", psutil.Process().memory_info().rss / 2**30, self.n_step)
        if self.device.type == "cuda":
            self.tb.add_scalar("memory/cuda_max_allocated_gib", torch.cuda.max_memory_allocated() / 2**30, self.n_step)
        if self.n_skipped_nonfinite:
            self.tb.add_scalar("faults/skipped_nonfinite_steps", self.n_skipped_nonfinite, self.n_step)
        if self.params.is_wandb:
            import wandb

            wandb.log({**{f"loss/{k}": v for k, v in values.items()}, "lr": lr, "tok_s": tok_s}, step=self.n_step)
        if bar is not None:
            bar.set_postfix({k: f"{v:.3f}" for k, v in values.items()}, refresh=False)
        logger.info("step %d | %s | lr %.2e | %.0f tok/s", self.n_step,
                    " ".join(f"{k} {v:.4f}" for k, v in values.items()), lr, tok_s)

    # --- checkpoints ---------------------------------------------------------------------------
    def _training_state(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "n_step": self.n_step,
            "batch_in_epoch": self.batch_in_epoch,
            "n_tokens": self.n_tokens,
            "n_skipped_nonfinite": self.n_skipped_nonfinite,
            "pairing": getattr(self.dataset, "pairing", None),
            "world_size": self.params.world_size,
            "data_fingerprint": getattr(self.params, "data_fingerprint", None),
            "rng": _rng_states_all_ranks(self.multi_gpu),
        }

    def save_checkpoint(self) -> Path | None:
        """Write `checkpoint-<step>/` atomically and prune beyond --save_total_limit.

        The folder holds the student (HF folder), the training state and `manifest.json` (size and
        blake2b of each file, written last). With --save_total_limit, checkpoints that the limit
        would remove anyway are removed first, oldest first, when the disk lacks room for a new
        one; the newest complete checkpoint is never removed before its successor exists. A full
        disk or another write error is a CliError naming the target and the intact previous one.
        """
        state = self._training_state()  # collective: every rank takes part
        self.last_checkpoint_step = self.n_step
        if not self.is_master:
            return None
        target = self.dump_path / f"{CHECKPOINT_PREFIX}{self.n_step}"
        self._make_room()
        for attempt in (1, 2):
            try:
                self._write_checkpoint(target, state)
                break
            except Exception as err:  # noqa: BLE001 -- safetensors and torch report write errors their own ways
                if attempt == 1 and is_disk_full(err) and self._remove_excess_checkpoints("the disk is full"):
                    continue
                raise self._write_error(target, err) from None
        logger.info("checkpoint written: %s", target)
        if self.on_checkpoint is not None:
            self.on_checkpoint(target)
        limit = self.params.save_total_limit
        if limit and limit > 0:
            for old in list_checkpoints(self.dump_path)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def _write_checkpoint(self, target: Path, state: dict) -> None:
        with atomic_dir(target) as tmp:
            self.student.save_pretrained(tmp, safe_serialization=True)
            save_training_state(state, tmp / STATE_FILE)
            write_manifest(tmp)

    def _write_error(self, target: Path, err: BaseException) -> CliError:
        found = list_checkpoints(self.dump_path)
        previous = f"the previous checkpoint {found[-1]} is intact" if found else "no checkpoint was written before"
        if is_disk_full(err):
            return CliError(f"no space left on device at {target}; {previous}; free space and resume with --resume")
        return CliError(f"could not write {target}: {type(err).__name__}: {err} ({previous})")

    def _excess_checkpoints(self) -> list[Path]:
        """Checkpoints that --save_total_limit removes once the next one is written (never the newest)."""
        limit = self.params.save_total_limit
        if not limit or limit <= 0:
            return []
        found = list_checkpoints(self.dump_path)
        return found[: max(0, len(found) - max(limit - 1, 1))]

    def _remove_excess_checkpoints(self, why: str, need: int | None = None) -> bool:
        removed = False
        for old in self._excess_checkpoints():  # oldest first
            if need is not None and shutil.disk_usage(self.dump_path).free >= need:
                break
            logger.warning("removing %s before writing the next checkpoint (--save_total_limit %d): %s", old,
                           self.params.save_total_limit, why)
            shutil.rmtree(old, ignore_errors=True)
            removed = True
        return removed

    def _make_room(self) -> None:
        """Free the checkpoints beyond --save_total_limit first when the disk may lack room for a new one."""
        found = list_checkpoints(self.dump_path)
        if not found or not self._excess_checkpoints():
            return
        need = folder_size(found[-1]) * 11 // 10 + (1 << 20)
        if shutil.disk_usage(self.dump_path).free < need:
            self._remove_excess_checkpoints("the disk is short of space", need)

    def check_replicas(self) -> None:
        """Under DDP, check that every rank holds the same student weights (bitwise), and say so."""
        if not self.multi_gpu:
            return
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.student.parameters()])
        digest = torch.stack([flat.sum(), (flat * flat).sum(), (flat * torch.arange(flat.numel(), device=flat.device,
                                                                                    dtype=torch.float64)).sum()])
        gathered = [torch.zeros_like(digest) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, digest)
        if any(not torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError(f"student weights differ across ranks: {[g.tolist() for g in gathered]}")
        if self.is_master:
            logger.info("all %d ranks hold identical student weights (digest %s)", len(gathered),
                        [f"{x:.6e}" for x in gathered[0].tolist()])

    def save_final(self) -> None:
        """The student as a plain HF model folder at --dump_path (config.json + model.safetensors)."""
        self.check_replicas()
        if not self.is_master:
            return
        # Each file lands complete: written in a hidden folder, then renamed into place.
        tmp = Path(tempfile.mkdtemp(prefix=".final.", suffix=".tmp", dir=self.dump_path))
        try:
            self.student.save_pretrained(tmp, safe_serialization=True)
            for f in sorted(tmp.iterdir()):
                os.replace(f, self.dump_path / f.name)
        except Exception as err:  # noqa: BLE001
            raise self._write_error(self.dump_path / "model.safetensors", err) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("student saved to %s", self.dump_path)
        if self.tb is not None:
            self.tb.flush()

    def load_checkpoint(self, folder: Path) -> None:
        """Restore a checkpoint written by `save_checkpoint` (weights, optimiser, data order, RNG).

        The folder is verified first (`checkpoint_problem`); a damaged one is a CliError naming the file.
        """
        from safetensors.torch import load_file

        folder = Path(folder)
        problem = checkpoint_problem(folder)
        if problem:
            raise CliError(f"checkpoint {folder} is damaged: {problem}")
        state_path = folder / STATE_FILE
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=False)
            weights = load_file(str(folder / "model.safetensors"), device="cpu")
        except Exception as err:  # noqa: BLE001 -- a damaged file gets one clear message
            raise CliError(f"checkpoint {folder} is damaged: cannot read it ({type(err).__name__}: {err})") from None
        recorded = state.get("data_fingerprint")
        if recorded is not None:
            check_fingerprint(self.params.data_file, recorded, getattr(self.params, "data_fingerprint", None))
        missing, unexpected = self.student.load_state_dict(weights, strict=False)
        tied = set(getattr(self.student, "_tied_weights_keys", None) or {})
        if unexpected or [k for k in missing if k not in tied]:
            raise CliError(f"checkpoint {folder} does not match the student: missing {missing}, unexpected {unexpected}")
        if state["world_size"] != self.params.world_size:
            raise CliError(f"checkpoint {folder} was written by {state['world_size']} processes; "
                           f"resume with the same number (now {self.params.world_size})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.n_step = state["epoch"], state["n_step"]
        self.batch_in_epoch, self.n_tokens = state["batch_in_epoch"], state["n_tokens"]
        self.n_skipped_nonfinite = state["n_skipped_nonfinite"]
        self.last_checkpoint_step = self.n_step
        _set_rng_state(state["rng"][self.params.global_rank])
        logger.info("resumed from %s: epoch %d, step %d, batch %d of the epoch", folder, self.epoch, self.n_step,
                    self.batch_in_epoch)
        if self.n_step >= self.total_steps:
            logger.info("this checkpoint already reached the %d steps asked for (raise --max_steps or --n_epoch to "
                        "train further)", self.total_steps)


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _usable_outside_inference(o: Outputs) -> Outputs:
    """Teacher tensors saved by a loss's backward must be normal tensors, not inference tensors.

    Only the cosine losses save the teacher's tensors; the head losses use the teacher's features
    without saving them, so those are not copied."""
    for name in ("hidden", "cf_hidden"):
        value = getattr(o, name)
        if value is not None:
            setattr(o, name, value.clone())
    return o


def _rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_states_all_ranks(multi_gpu: bool) -> list[dict]:
    mine = _rng_state()
    if not multi_gpu:
        return [mine]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
