"""Sharded data parallelism with PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`): causal_train.py --fsdp.

Under `--fsdp` every rank holds 1/N of the student's parameters, gradients and AdamW state
instead of all of them (DDP); with `--fsdp_teacher` also 1/N of the frozen teacher. The models
stay stock HF modules: `fully_shard` is applied to each transformer block and to a small root
module around the model (which then holds the embeddings, the final norm and the LM head), and
the interventions keep working as forward hooks on the sharded blocks.

What differs from DDP, and why:

- **The student's root is `StudentLosses`**, whose forward runs the student's base, source and
  counterfactual runs *and* the losses. FSDP gathers the root's parameters (the embeddings and
  the LM head) in the root's pre-forward hook and keeps them until the backward; the chunked head
  losses read `projection.weight` inside that forward, so they see the gathered weight (a plain
  tensor), never a shard. Blocks are gathered and freed one at a time, in every run that uses
  them (a block run three times in a step is gathered three times in the forward, and its
  gradient is reduce-scattered after each of its backward passes).
- **The teacher's root is `TeacherRuns`**, run without gradients (under `torch.no_grad()`: torch
  2.13's FSDP2 gathers a one-rank group with an op that refuses inference tensors). FSDP keeps a
  root's parameters gathered after its forward; the student's losses read the teacher's LM head
  from there, then `release_teacher` frees it.
- **Every rank runs the same blocks.** The all-gathers are collectives: ranks that ran different
  blocks would wait for each other forever. The blocks a step runs depend only on the mapping
  entry drawn for it, which every rank draws from the same seeded generator; `same_entry`
  broadcasts rank 0's draw as well, so a difference can never hang the run.
- **Gradients are reduce-scattered at every micro-step** (DDP synchronises on the last one only):
  a rank then holds only its shard of the accumulated gradient, not the whole of it.

The mixed-precision policy of `--bf16`: parameters gathered and computed in bf16, sharded master
weights and the gradients' reduction in fp32 (`MixedPrecisionPolicy(bf16, fp32)`), with the same
autocast as the unsharded path. `--fsdp_cpu_offload` keeps the student's shards, gradients and
optimizer state in host memory (`CPUOffloadPolicy`); the optimizer step then runs on the CPU.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from interventions import family_of, get_submodule, model_outputs

FSDP_FLAGS = ("fsdp_teacher", "fsdp_cpu_offload")


def fsdp_flag_problem(args) -> str | None:
    """Why the --fsdp flags of `args` cannot run as given (before anything is loaded), or None."""
    for flag in FSDP_FLAGS:
        if getattr(args, flag) and not args.fsdp:
            return f"--{flag} needs --fsdp"
    if not args.fsdp:
        return None
    if args.fp16:
        return "--fp16 cannot be combined with --fsdp (FSDP's mixed precision here is bf16): use --bf16"
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return ("--fsdp shards the models across the processes of torchrun: launch with "
                "`torchrun --nproc_per_node N causal_train.py --fsdp ...` (N >= 1; one process per GPU)")
    return None


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an LM of `interventions.FAMILIES`."""
    fam = family_of(model)
    return get_submodule(getattr(model, fam.backbone), fam.blocks)


class StudentLosses(nn.Module):
    """The student's runs of one step and their losses, in one forward: the FSDP root of the student."""

    def __init__(self, model: nn.Module, compute_losses: Callable):
        super().__init__()
        self.model = model
        self.compute_losses = compute_losses

    def forward(self, batches, sites, needs, data_augment: bool, shared_prefix: bool, t_outs, alphas, temperature,
                *divergences):
        s_outs = [model_outputs(self.model, p, sites, needs, want_logits=needs.logits, data_augment=data_augment,
                                shared_prefix=shared_prefix) for p in batches]
        per_pair = [self.compute_losses(s, t, p, alphas, temperature, *divergences)
                    for s, t, p in zip(s_outs, t_outs, batches)]
        return s_outs, per_pair


class TeacherRuns(nn.Module):
    """The teacher's runs of one step, in one forward: the FSDP root of a sharded teacher."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batches, sites, needs, data_augment: bool, shared_prefix: bool):
        return [model_outputs(self.model, p, sites, needs, want_logits=needs.teacher_logits,
                              data_augment=data_augment, shared_prefix=shared_prefix) for p in batches]


def policies(params, trainable: bool):
    """(mixed-precision policy, offload policy) of a model: bf16 compute with fp32 reduction for the
    student under --bf16; the student's shards in host memory with --fsdp_cpu_offload."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    mp = MixedPrecisionPolicy()
    if trainable and params.bf16:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    offload = OffloadPolicy()
    if trainable and params.fsdp_cpu_offload:
        offload = CPUOffloadPolicy(pin_memory=params.device.type == "cuda")
    return mp, offload


def shard(model: nn.Module, root: nn.Module, mesh, mp_policy, offload_policy) -> None:
    """`fully_shard` each block of `model`, then `root` (which holds the model): every parameter of
    `model` outside its blocks (embeddings, final norm, LM head) belongs to the root's group."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks_of(model):
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    fully_shard(root, mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)


class FsdpEngine:
    """The student (and with --fsdp_teacher the teacher) sharded over the ranks of the process group.

    Build it before the optimizer: `fully_shard` replaces the parameters by their shards (DTensors),
    which the optimizer must hold. `params` is the run's `distill_config.DistillConfig`.
    """

    def __init__(self, params, student: nn.Module, teacher: nn.Module, compute_losses: Callable):
        from torch.distributed.device_mesh import init_device_mesh

        self.params = params
        self.mesh = init_device_mesh(params.device.type, (params.world_size,))
        self.student_step = StudentLosses(student, compute_losses)
        shard(student, self.student_step, self.mesh, *policies(params, trainable=True))
        self.teacher_step = None
        if params.fsdp_teacher:
            self.teacher_step = TeacherRuns(teacher)
            shard(teacher, self.teacher_step, self.mesh, *policies(params, trainable=False))

    def teacher_mode(self):
        """The teacher's grad mode: `torch.inference_mode()`, or `torch.no_grad()` for a sharded teacher (torch 2.13's
        FSDP2 gathers a one-rank group with an op that inference tensors refuse)."""
        return torch.no_grad() if self.teacher_step is not None else torch.inference_mode()

    def teacher_outputs(self, teacher: nn.Module, prepared, sites, needs, data_augment: bool, shared_prefix: bool):
        """The teacher's outputs of each prepared batch (call under `teacher_mode()`)."""
        if self.teacher_step is not None:
            return self.teacher_step(prepared, sites, needs, data_augment, shared_prefix)
        return [model_outputs(teacher, p, sites, needs, want_logits=needs.teacher_logits, data_augment=data_augment,
                              shared_prefix=shared_prefix) for p in prepared]

    def student_losses(self, prepared, sites, needs, data_augment: bool, shared_prefix: bool, t_outs, alphas,
                       temperature, *divergences):
        """(the student's outputs, [(loss values, weighted total)] per prepared batch); frees the teacher's
        gathered root afterwards."""
        try:
            return self.student_step(prepared, sites, needs, data_augment, shared_prefix, t_outs, alphas,
                                     temperature, *divergences)
        finally:
            self.release_teacher()

    def release_teacher(self) -> None:
        """Free the sharded teacher's gathered root (embeddings and LM head) once the losses have read it."""
        if self.teacher_step is not None:
            self.teacher_step.reshard()

    def same_entry(self, index: int) -> int:
        """Rank 0's mapping entry, on every rank (the blocks a step gathers must be the same everywhere)."""
        flag = torch.tensor([index], dtype=torch.long, device=self.params.device)
        dist.broadcast(flag, src=0)
        return int(flag.item())
