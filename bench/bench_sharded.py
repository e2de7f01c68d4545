"""DDP against FSDP in bench_train_step.py (`--fsdp`): per-rank peak memory and step time under torchrun.

    python bench/bench_train_step.py --preset tiny_clm --fsdp --ranks 1,2,4 --modes diito_shared --dtypes fp32 --threads 1
    python bench/bench_train_step.py --preset mid_clm --fsdp --engines ddp,fsdp,fsdp_teacher --modes diito_shared --dtypes fp32

For each rank count and engine one torchrun child runs the mode's steps as causal_train.py runs them
(`distill_setup.build_from_models`, `CausalDistiller.step`; the engine `fsdp` as `causal_train.py --fsdp`,
`fsdp_teacher` as `--fsdp --fsdp_teacher`). Every rank draws its own batches of the preset's batch size.
Per rank it measures

- **peak memory during the steps**: on the CPU the peak resident set size (VmHWM) of the steps alone:
  after the set-up, freed memory is handed back to the system (`malloc_trim`) and the kernel's
  high-water mark is reset (`/proc/self/clear_refs`), so what the steps hold (weights, gradients,
  optimizer state, activations, gathered blocks, communication buffers; and the process's own
  libraries, about the same for both engines) is what is counted; on CUDA `max_memory_allocated`;
- **the set-up peak**: every rank builds the full models before sharding them (as causal_train.py
  loads them), so this is the same for both engines;
- **the weights and AdamW state the rank holds** (its shards under FSDP), counted from the tensors.

The step time is the median over the timed steps of the slowest rank (a barrier closes each step).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def torchrun_command(child: list[str], ranks: int, engine: str) -> list[str]:
    """bench_train_step.py's child command line `child` (python, script, flags) under torchrun with `ranks` processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(port),
           *child[1:], "--engine", engine]
    return cmd


def _memory_gib(field: str) -> float:
    """A field of /proc/self/status (VmHWM: peak resident set size, VmRSS: now) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak(device) -> None:
    """Forget the set-up's peak: from now on the peak is that of what follows."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    name = ctypes.util.find_library("c")
    if name:
        ctypes.CDLL(name).malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as fh:  # 5: reset the peak resident set size (Linux >= 4.0)
        fh.write("5")


def peak_gib(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else _memory_gib("VmHWM")


def held_gib(tensors) -> float:
    """GiB of the tensors this rank holds (a DTensor's local shard only)."""
    from torch.distributed.tensor import DTensor

    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total / 2**30


def _config(bench, args, cfg, mlm: bool, device, ids: dict):
    """The run's config for this child: causal_train.py's arguments with the engine's flags, on this rank."""
    from devices import init_runtime
    from distill_config import DistillConfig

    params = bench.train_args(args, cfg, mlm)
    params.fsdp = args.engine in ("fsdp", "fsdp_teacher")
    params.fsdp_teacher = args.engine == "fsdp_teacher"
    params.fsdp_cpu_offload = False
    params.n_gpu = 1 if device.type == "cuda" else 0
    runtime = init_runtime(params.n_gpu, params.local_rank, params.fsdp)
    return DistillConfig.in_memory(params, runtime, ids, cfg["max_len"])


def run_sharded(args) -> dict | None:
    """One (mode, dtype, engine) on this rank of a torchrun child; returns the row on rank 0 (None elsewhere)."""
    import numpy as np
    import torch
    import torch.distributed as dist

    import bench_setup as bench
    from distill_setup import build_from_models
    from neuron_mapping import MappingEntry
    from devices import tune_cpu_allocator

    import faulthandler
    import signal

    faulthandler.enable()  # a crash, or SIGUSR1 to a rank that hangs, prints every thread's Python stack
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    tune_cpu_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = bench.preset_of(args)
    device = torch.device(args.device)
    mlm = cfg.get("family") is None
    ids = bench.SPECIAL_IDS["bert" if mlm else cfg["family"]]
    params = _config(bench, args, cfg, mlm, device, ids)
    dataset = bench.build_dataset(args, cfg, ids)
    teacher, student = bench.build_models(cfg)
    token_probs = None
    if mlm:
        token_probs = torch.ones(cfg["vocab"])
        token_probs[list(ids.values())] = 0
    entry = MappingEntry(0, {cfg["t_site"]: tuple(range(cfg["hidden"]))}, {cfg["s_site"]: tuple(range(cfg["hidden"]))},
                         (), ())
    run = build_from_models(params, teacher, student, dataset, token_probs, [entry])
    del teacher, student
    distiller = run.distiller
    run.student.train()
    rng = np.random.default_rng(1000 + params.global_rank)  # each rank its own batches
    batches = [dataset.batch_sequences([dataset[int(i)] for i in rng.choice(len(dataset), cfg["batch"], replace=False)])
               for _ in range(args.warmup + args.steps)]
    setup_peak = peak_gib(device)
    reset_peak(device)
    times, tokens, losses = _timed_steps(distiller, batches, args.warmup, params.multi_gpu, device)
    mine = dict(peak=peak_gib(device), setup_peak=setup_peak, times=times, tokens=tokens,
                student_gib=held_gib(run.student.parameters()),
                optimizer_gib=held_gib(v for s in distiller.optimizer.state.values() for v in s.values()
                                       if isinstance(v, torch.Tensor)),
                teacher_gib=held_gib(run.teacher.parameters()))
    # The models, DDP's reducer and FSDP's state go before the process group: freed after it (when this frame
    # ends), they hung a rank now and then in their destructors, or aborted it ("terminate called without an
    # active exception").
    del run, distiller
    gc.collect()
    gathered = [mine]
    if params.multi_gpu:
        gathered = [None] * params.world_size
        dist.all_gather_object(gathered, mine)
        dist.barrier()
        dist.destroy_process_group()
    if params.global_rank != 0:
        return None
    return _row(args, params, gathered, losses)


def _timed_steps(distiller, batches, warmup: int, distributed: bool, device):
    """Run one optimiser step per batch; returns (the timed steps' times, their real tokens, their losses)."""
    import torch
    import torch.distributed as dist

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        if distributed:
            dist.barrier()

    times, tokens, losses = [], 0, []
    for i, batch in enumerate(batches):
        sync()
        start = time.perf_counter()
        out = distiller.step([batch])
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens += int(batch["base_lengths"].sum())
            losses.append(float(out["loss"]))
    return times, tokens, losses


def _row(args, params, ranks: list[dict], losses: list[float]) -> dict:
    step_times = [max(r["times"][i] for r in ranks) for i in range(len(ranks[0]["times"]))]
    return dict(engine=args.engine, ranks=params.world_size,
                mode=args.mode, dtype=args.dtype, preset=args.preset, median_step_s=statistics.median(step_times),
                tok_s=sum(r["tokens"] for r in ranks) / sum(step_times),
                peak_gib=max(r["peak"] for r in ranks), peak_gib_per_rank=[r["peak"] for r in ranks],
                setup_peak_gib=max(r["setup_peak"] for r in ranks),
                student_gib=max(r["student_gib"] for r in ranks), optimizer_gib=max(r["optimizer_gib"] for r in ranks),
                teacher_gib=max(r["teacher_gib"] for r in ranks), mean_loss=statistics.mean(losses),
                load_avg=os.getloadavg()[0], threads=args.threads)


def print_sharded_table(args, rows: list[dict], failures: list[str]) -> None:
    """The memory and time of each (engine, ranks), and FSDP's peak over DDP's at the same rank count."""
    import torch

    from bench_machine import cpu_description

    machine = f"{cpu_description()}, {os.cpu_count()} cores" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"\n## bench_train_step --preset {args.preset} --fsdp ({args.device}; {machine}; torch {torch.__version__}; "
          f"{args.steps} timed steps after {args.warmup}; {time.strftime('%Y-%m-%d')})\n")
    print("| engine | ranks | mode | dtype | median step (s) | real tok/s (all ranks) | peak mem per rank, steps (GiB) "
          "| set-up peak (GiB) | student weights + AdamW held per rank (GiB) | teacher weights per rank (GiB) "
          "| load avg (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['ranks']} | {r['mode']} | {r['dtype']} | {r['median_step_s']:.2f} | "
              f"{r['tok_s']:.0f} | {r['peak_gib']:.2f} | {r['setup_peak_gib']:.2f} | "
              f"{r['student_gib']:.3f} + {r['optimizer_gib']:.3f} | {r['teacher_gib']:.3f} | {r['load_avg']:.1f} |")
    if failures:
        print("\nfailed (not in the table):\n" + "\n".join(f"- {f}" for f in failures))
