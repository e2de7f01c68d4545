"""The machine a run uses: seeding, the process group and device from torchrun's environment, the CPU's
allocator and bf16 support, and FLOP formulas torch lacks for the CPU."""
from __future__ import annotations

import os
import random
import socket
import sys
from pathlib import Path

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


def init_gpu_params(params) -> None:
    """Fill the distributed fields of `params` from torchrun's environment and start the process group.

    Reads `RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`
    (set by `torchrun`). Without them the run is single-process: on one GPU when `--n_gpu` > 0
    and CUDA is available, on the CPU otherwise. Sets `params.multi_gpu`, `is_master`,
    `global_rank`, `world_size`, `local_rank`, `n_nodes`, `node_id`, `multi_node` and `device`.
    The backend is nccl on CUDA and gloo on the CPU.
    """
    import torch

    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    # --fsdp under torchrun runs in a process group even with one process (to shard or offload on one GPU)
    sharded_alone = getattr(params, "fsdp", False) and "RANK" in os.environ
    use_cuda = params.n_gpu > 0 and torch.cuda.is_available()
    if params.n_gpu > 0 and not torch.cuda.is_available():
        logger.warning("--n_gpu %d asked for but CUDA is not available: training on the CPU", params.n_gpu)
    if env_world > 1 or sharded_alone:
        params.global_rank = int(os.environ["RANK"])
        params.world_size = env_world
        params.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(env_world)))
        params.n_nodes = max(1, env_world // local_world)
        params.node_id = params.global_rank // local_world
        params.multi_gpu = True
    else:
        params.global_rank = 0
        params.world_size = 1
        params.local_rank = 0 if params.local_rank in (-1, None) else params.local_rank
        params.n_nodes = 1
        params.node_id = 0
        params.multi_gpu = False
        if params.n_gpu > 1:
            logger.warning(
                "--n_gpu %d without torchrun runs on one device; launch with "
                "`torchrun --nproc_per_node %d causal_train.py ...` for data parallelism",
                params.n_gpu,
                params.n_gpu,
            )
    params.multi_node = params.n_nodes > 1
    params.is_master = params.global_rank == 0
    if use_cuda:
        torch.cuda.set_device(params.local_rank)
        params.device = torch.device("cuda", params.local_rank)
    else:
        params.device = torch.device("cpu")
    if params.multi_gpu:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    logger.info(
        "node %d/%d, rank %d/%d, local rank %d, device %s, host %s",
        params.node_id,
        params.n_nodes,
        params.global_rank,
        params.world_size,
        params.local_rank,
        params.device,
        socket.gethostname(),
    )


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
