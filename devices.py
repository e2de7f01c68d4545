"""The machine a run uses: seeding, the process group and device from torchrun's environment, the CPU's
allocator and bf16 support, and FLOP formulas torch lacks for the CPU."""
from __future__ import annotations

import os
import random
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils import logger


def set_seed(seed: int) -> None:
    """Seed Python's `random`, NumPy and torch (all CUDA devices too).

    The original seeded only NumPy and torch, so `--seed` reproduced neither the base/source pairs
    nor the interchange positions; every random draw in this project goes through one of these.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device and its place among torchrun's processes (`init_runtime`)."""

    device: Any  # torch.device
    multi_gpu: bool  # in a process group (torchrun with several processes, or --fsdp under torchrun)
    is_master: bool
    global_rank: int
    world_size: int
    local_rank: int
    n_nodes: int
    node_id: int
    multi_node: bool


def single_process(device=None) -> Runtime:
    """The `Runtime` of one process without a process group, on `device` (the CPU by default)."""
    import torch

    return Runtime(device=device or torch.device("cpu"), multi_gpu=False, is_master=True, global_rank=0, world_size=1,
                   local_rank=0, n_nodes=1, node_id=0, multi_node=False)


def init_runtime(n_gpu: int, local_rank: int | None = -1, fsdp: bool = False) -> Runtime:
    """This process's `Runtime` from torchrun's environment; starts the process group when there is one.

    Reads `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`
    (set by `torchrun`). Without them the run is single-process: on one GPU when `n_gpu` > 0 and CUDA
    is available, on the CPU otherwise. The backend is nccl on CUDA and gloo on the CPU. `fsdp` under
    torchrun runs in a process group even with one process (to shard or offload on one GPU).
    """
    import torch

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = n_gpu > 0 and torch.cuda.is_available()
    if n_gpu > 0 and not torch.cuda.is_available():
        logger.warning("--n_gpu %d asked for but CUDA is not available: training on the CPU", n_gpu)
    if env_world > 1 or (fsdp and "RANK" in os.environ):
        global_rank, world_size = int(os.environ["RANK"]), env_world
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(env_world)))
        n_nodes, node_id, multi_gpu = max(1, env_world // local_world), global_rank // local_world, True
    else:
        global_rank, world_size, n_nodes, node_id, multi_gpu = 0, 1, 1, 0, False
        local_rank = 0 if local_rank in (-1, None) else local_rank
        if n_gpu > 1:
            logger.warning("--n_gpu %d without torchrun runs on one device; launch with "
                           "`torchrun --nproc_per_node %d causal_train.py ...` for data parallelism", n_gpu, n_gpu)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if multi_gpu:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    runtime = Runtime(device=device, multi_gpu=multi_gpu, is_master=global_rank == 0, global_rank=global_rank,
                      world_size=world_size, local_rank=local_rank, n_nodes=n_nodes, node_id=node_id,
                      multi_node=n_nodes > 1)
    logger.info("node %d/%d, rank %d/%d, local rank %d, device %s, host %s", node_id, n_nodes, global_rank,
                world_size, local_rank, device, socket.gethostname())
    return runtime


def end_process_group() -> None:
    """Destroy the process group, if any, once nothing refers to it any more: the models, DDP's reducer and FSDP's
    state must be gone first (freed after it, at interpreter exit, a rank now and then aborted in their
    destructors: "terminate called without an active exception")."""
    import gc

    import torch.distributed as dist

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def tune_cpu_allocator() -> None:
    """Keep large freed blocks in glibc's heap instead of returning them to the kernel.

    The vocabulary-wide losses allocate and free blocks of tens to hundreds of MB every step; by
    default glibc serves each with a fresh mmap, and the page faults of touching it again cost
    more than the arithmetic (about 2x on the tiny benchmark's CPU step). A no-op off glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
        libc.mallopt(m_top_pad, 64 << 20)
    except (OSError, AttributeError):
        pass


def count_cpu_flash_attention() -> None:
    """Teach torch's FlopCounterMode the CPU's fused attention kernel (it has formulas for the CUDA
    ones only): without this, the attention matmuls of a step on the CPU would go uncounted.
    Used where FLOPs are counted (scripts/count_step_flops.py, bench/bench_train_step.py)."""
    import torch
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    try:
        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
        def _forward(query, key, value, *args, out_shape=None, **kwargs):
            return sdpa_flop_count(query, key, value)

        @register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
        def _backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
            return sdpa_backward_flop_count(grad_out, query, key, value)
    except (AttributeError, RuntimeError):  # another torch: the op or the registry differs, or it is registered
        pass


# bf16 on the CPU is fast only with bf16 arithmetic instructions; elsewhere it is emulated.
BF16_CPU_FLAGS = {"x86_64": ("avx512_bf16", "amx_bf16"), "aarch64": ("bf16",)}


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo, or None where they cannot be read (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags or None


def cpu_bf16_warning() -> str | None:
    """A warning when this CPU has no bf16 instructions (bf16 is then slower than fp32), else None.

    None too where the flags cannot be read or the architecture is not one we know.
    """
    import platform

    import torch

    wanted = BF16_CPU_FLAGS.get(platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64"))
    flags = cpu_flags()
    if wanted is None or flags is None or any(f in flags for f in wanted):
        return None
    return (f"bf16 on a CPU without bf16 instructions (torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"none of the flags {', '.join(wanted)}): bf16 is emulated here and runs slower than fp32, "
            "so fp32 (no --bf16) will be faster. bf16 is still used as asked.")
