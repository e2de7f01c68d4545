"""Benchmark of the distillation training step: standard KD, DIITO plain path, DIITO shared prefix.

Not a test: it prints figures. Each (mode, precision) runs in a fresh subprocess so its peak
memory is its own. Per mode: median step time, sequences/s, real tokens/s, peak memory (RSS on the
CPU, max_memory_allocated on CUDA), model FLOPs per step (counted by torch's FlopCounterMode from
the shapes of every matmul the step actually runs, forward and backward) and utilisation: achieved
FLOP/s over a yardstick measured in the same run (a large fp32 / bf16 matmul, timed between the
mode's steps so that both see the same machine; the device's bf16 dense peak on known GPUs).

    python bench/bench_train_step.py --preset tiny --data_file ../shared/fixtures/wikitext-demo/binarized_text.train.bert-base-uncased.pickle
    python bench/bench_train_step.py --preset base --device cuda --dtypes bf16
    python bench/bench_train_step.py --preset tiny_clm   # Llama-layout causal LMs (losses ce + clm)
    python bench/bench_train_step.py --preset base --device cuda --dtypes bf16 --seq_len 512 --max_batch
    python bench/bench_train_step.py --preset base_clm --device cuda --dtypes bf16 --seq_len 512

On CUDA the yardstick is an 8192^3 matmul of the mode's precision timed with CUDA events in the same
process (the datasheet's dense bf16 peak is printed beside it, never used as the yardstick).
`--seq_len L` makes every synthetic sequence L tokens long (no padding: the device's best case);
`--max_batch` then also searches the largest batch of such sequences that one step fits in, and
reports peak memory per token; `--profile DIR` writes a torch.profiler table of three steps per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_machine import Yardstick, cpu_description, describe_exit
from bench_setup import PRESETS, SPECIAL_IDS, build_dataset, build_models, preset_of, train_args

ROOT = Path(__file__).resolve().parent.parent

def _count_gqa_attention() -> None:
    """FlopCounterMode's attention formulas assert that query, key and value have the same number of
    heads; CUDA's kernels take grouped-query attention (Llama's 16 query heads over 8 key/value heads)
    as is. Count such a call as the attention it computes: each key/value head serves its group."""
    import torch.utils.flop_counter as fc

    if getattr(fc, "_causal_distill_gqa", False):
        return
    forward, backward = fc.sdpa_flop_count, fc.sdpa_backward_flop_count

    def widened(query_shape, shape):
        if len(shape) == 4 and len(query_shape) == 4 and shape[1] != query_shape[1]:
            return (shape[0], query_shape[1], shape[2], shape[3])
        return shape

    fc.sdpa_flop_count = lambda q, k, v, *a, **kw: forward(q, widened(q, k), widened(q, v), *a, **kw)
    fc.sdpa_backward_flop_count = lambda g, q, k, v, *a, **kw: backward(g, q, widened(q, k), widened(q, v), *a, **kw)
    fc._causal_distill_gqa = True


def run_single(args) -> dict:
    """One (mode, dtype) in this process; returns its figures."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from devices import count_cpu_flash_attention, tune_cpu_allocator

    tune_cpu_allocator()  # as causal_train.py does
    count_cpu_flash_attention()
    _count_gqa_attention()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset_of(args)
    device = torch.device(args.device)
    mlm = cfg.get("family") is None
    ids = SPECIAL_IDS["bert" if mlm else cfg["family"]]
    dataset = build_dataset(args, cfg, ids)
    distiller = _distiller(args, cfg, device, dataset, ids, mlm)

    def step(batch):
        return distiller.step([batch])

    rng = np.random.default_rng(1)
    n_batches = args.warmup + args.steps
    batches = []
    for _ in range(n_batches):
        idx = rng.choice(len(dataset), size=cfg["batch"], replace=False)
        batches.append(dataset.batch_sequences([dataset[int(i)] for i in idx]))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    # On the CPU the yardstick matmul runs between the timed steps, so that both see the same
    # machine (a shared VM's speed drifts by 10-20% over minutes).
    stick = Yardstick(args.device, args.dtype)
    times, tokens, seqs, losses_seen = [], 0, 0, []
    for i, batch in enumerate(batches):
        sync()
        start = time.perf_counter()
        losses = step(batch)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens += int(batch["base_lengths"].sum())
            seqs += len(batch["base_lengths"])
            losses_seen.append(float(losses["loss"]))
            stick.sample()
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # FLOPs of one representative step (the batch of median real-token count), forward and backward.
    counted = []
    for batch in batches[args.warmup:][:3]:
        with FlopCounterMode(display=False) as counter:
            step(batch)
        counted.append((counter.get_total_flops(), int(batch["base_lengths"].sum())))
    flops_per_token = sum(f for f, _ in counted) / sum(n for _, n in counted)
    median = statistics.median(times)
    tok_s = tokens / sum(times)
    result = dict(
        mode=args.mode, dtype=args.dtype, median_step_s=median, seq_s=seqs / sum(times), tok_s=tok_s,
        peak_gib=peak, gflop_per_token=flops_per_token / 1e9, flop_s=flops_per_token * tok_s,
        mean_loss=statistics.mean(losses_seen), forwards=distiller.forward_counts, yardstick=stick.value(),
        tokens_per_step=tokens / max(len(times), 1), peak_gib_per_ktok=peak / max(tokens / max(len(times), 1), 1) * 1e3,
        datasheet_peak=stick.datasheet,
    )
    if args.profile:
        result["profile"] = _profile(step, batches[args.warmup:][:3], Path(args.profile), f"{args.mode}_{args.dtype}")
    if args.max_batch and device.type == "cuda":
        result["max_batch"] = _max_batch(distiller, dataset, cfg, step)
    return result


def _profile(step, batches, folder: Path, name: str) -> str:
    """torch.profiler over `batches`: the operator table by device time, written to folder/name.txt."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.txt"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60))
    return str(path)


def _max_batch(distiller, dataset, cfg, step) -> dict:
    """The largest batch of the dataset's (fixed-length) sequences that one training step fits in:
    doubling from the preset's batch until out of memory, then halving the gap four times."""
    import gc

    import torch

    from utils import CliError

    def fits(n: int) -> float | None:
        idx = [i % len(dataset) for i in range(n)]
        batch = dataset.batch_sequences([dataset[i] for i in idx])
        torch.cuda.reset_peak_memory_stats()
        try:
            step(batch)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**30
        except (CliError, torch.OutOfMemoryError) as err:
            if "out of memory" not in str(err):
                raise
            return None
        finally:
            distiller.optimizer.zero_grad(set_to_none=True)
            del batch
            gc.collect()
            torch.cuda.empty_cache()

    tried = {}
    good, bad = 0, None
    n = cfg["batch"]
    while bad is None and n <= 8192:
        tried[n] = fits(n)
        if tried[n] is None:
            bad = n
        else:
            good, n = n, n * 2
    for _ in range(4 if bad else 0):
        mid = (good + bad) // 2
        if mid in (good, bad):
            break
        tried[mid] = fits(mid)
        good, bad = (mid, bad) if tried[mid] is not None else (good, mid)
    length = int(dataset.lengths.max()) if len(dataset) else 0
    peak = tried.get(good)
    return dict(largest=good, first_failure=bad, seq_len=length, peak_gib=peak,
                peak_gib_per_ktok=(peak / (good * length) * 1e3) if peak and good else None,
                tried={str(k): v for k, v in sorted(tried.items())})


def _distiller(args, cfg: dict, device, dataset, ids: dict, mlm: bool):
    """The distiller of one (mode, dtype), as causal_train.py builds it (`build_from_models`), on in-memory
    models and data; one full-width mapping entry at the preset's sites."""
    import torch

    from devices import single_process
    from distill_config import DistillConfig
    from distill_setup import build_from_models
    from neuron_mapping import MappingEntry

    teacher, student = build_models(cfg)
    config = DistillConfig.in_memory(train_args(args, cfg, mlm), single_process(device), ids, cfg["max_len"])
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.head_align is not None:
        import losses

        losses.HEAD_ALIGN[device.type] = args.head_align
    token_probs = None
    if mlm:
        token_probs = torch.ones(cfg["vocab"])
        token_probs[list(ids.values())] = 0
    t, s = cfg["t_site"], cfg["s_site"]
    hidden = cfg["hidden"]
    entry = MappingEntry(0, {t: tuple(range(hidden))}, {s: tuple(range(hidden))}, (), ())
    distiller = build_from_models(config, teacher, student, dataset, token_probs, [entry]).distiller
    student.train()
    return distiller


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="Model sizes and batch size.")
    parser.add_argument("--data_file", default=None,
                        help="Binarized corpus to draw batches from (default: synthetic lengths like WikiText).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where to run.")
    parser.add_argument("--modes", default="kd,diito_plain,diito_shared",
                        help="Comma-separated modes: kd, diito_plain, diito_shared; kd_on_policy (causal-LM presets: KD "
                             "on the student's own samples for every batch, the cost of --on_policy_fraction 1).")
    parser.add_argument("--dtypes", default="fp32,bf16",
                        help="Comma-separated precisions (fp32, bf16; fp16 on CUDA only, with the grad scaler).")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="Sequences per step (default: the preset's; the paper's is 40).")
    parser.add_argument("--steps", type=int, default=8, help="Timed steps per mode.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed steps first.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--compile", action="store_true", help="As causal_train.py --compile (the KL kernel compiled).")
    parser.add_argument("--force_bf16", action="store_true",
                        help="Run the bf16 modes on a CPU without bf16 instructions too (skipped by default: "
                             "bf16 is emulated there, far slower than fp32).")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="Seconds one (mode, precision) may run before it is stopped and reported as failed.")
    parser.add_argument("--json_out", default=None, help="Also write the figures to this JSON file.")
    parser.add_argument("--seq_len", type=int, default=None,
                        help="Synthetic sequences all of this many tokens (capped at the preset's positions) instead "
                             "of WikiText-like lengths: no padding, the device's best case.")
    parser.add_argument("--max_batch", action="store_true",
                        help="CUDA: also find the largest batch one step fits in (doubling, then bisecting) and its "
                             "peak memory per token. Use with --seq_len 512.")
    parser.add_argument("--pad_to_multiple_of", type=int, default=None,
                        help="As causal_train.py's flag (default: 64 on CUDA, 1 on the CPU).")
    parser.add_argument("--no_cudnn_sdp", action="store_true",
                        help="CUDA: switch off the cuDNN attention backend of scaled_dot_product_attention.")
    parser.add_argument("--head_align", type=int, default=None,
                        help="Pad the head's vocabulary to a multiple of this (losses.HEAD_ALIGN; default: 64 on "
                             "CUDA, none on the CPU; 0 or 1: off).")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="Write a torch.profiler operator table of three steps per mode to DIR/<mode>_<dtype>.txt.")
    parser.add_argument("--fsdp", action="store_true",
                        help="Compare DDP and FSDP (causal_train.py --fsdp) under torchrun at each --ranks: per-rank peak "
                             "memory and step time (bench/bench_sharded.py says what is measured).")
    parser.add_argument("--ranks", default="1,2,4", help="With --fsdp: comma-separated numbers of processes.")
    parser.add_argument("--engines", default="ddp,fsdp",
                        help="With --fsdp: comma-separated engines: ddp, fsdp (the student sharded), fsdp_teacher "
                             "(the teacher too).")
    parser.add_argument("--engine", choices=["ddp", "fsdp", "fsdp_teacher"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp/bench_train_step", help=argparse.SUPPRESS)
    return parser


# Flags a child process takes from its parent as they are (flag, value or None for a switch).
FORWARDED = ("data_file", "batch_size", "threads", "seq_len", "profile", "pad_to_multiple_of", "head_align")
FORWARDED_SWITCHES = ("compile", "max_batch", "no_cudnn_sdp")


def child_command(args, mode: str, dtype: str) -> list[str]:
    """The command line of one (mode, dtype) child, with the parent's flags."""
    cmd = [sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--mode", mode,
           "--dtype", dtype, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    for name in FORWARDED:
        if getattr(args, name) is not None:
            cmd += [f"--{name}", str(getattr(args, name))]
    return cmd + [f"--{name}" for name in FORWARDED_SWITCHES if getattr(args, name)]


def run_child(cmd: list[str], timeout: float) -> tuple[dict | None, tuple[str, str] | None]:
    """Run one child; returns (its row of figures, None) or (None, (why it failed, the end of its stderr))."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except subprocess.TimeoutExpired as err:
        stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        return None, (f"timed out after {timeout:g} s (--timeout)", stderr)
    if out.returncode != 0:
        return None, (describe_exit(out.returncode), out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1]), None


def main() -> None:
    args = build_parser().parse_args()
    if args.mode and args.engine:  # one rank of a torchrun child (--fsdp)
        from bench_sharded import run_sharded

        row = run_sharded(args)
        if row is not None:
            print(json.dumps(row))
        return
    if args.mode:  # child process
        print(json.dumps(run_single(args)))
        return
    if args.fsdp:
        return main_sharded(args)

    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in ("fp32", "bf16", "fp16")]
    if unknown or (args.device == "cpu" and "fp16" in dtypes):
        sys.exit(f"--dtypes {args.dtypes}: the precisions are fp32, bf16 and fp16, and fp16 needs --device cuda")
    if args.device == "cpu" and "bf16" in dtypes and not args.force_bf16:
        from devices import cpu_bf16_warning

        warning = cpu_bf16_warning()
        if warning:
            print(f"skipping the bf16 modes: {warning} (--force_bf16 runs them anyway)", file=sys.stderr, flush=True)
            dtypes.remove("bf16")
            if not dtypes:
                sys.exit("nothing to run: --dtypes named only bf16")
    rows, failures = [], []
    for dtype in dtypes:
        for mode in args.modes.split(","):
            print(f"running {mode} {dtype} ...", file=sys.stderr, flush=True)
            row, failure = run_child(child_command(args, mode, dtype), args.timeout)
            if failure:
                reason, stderr = failure
                print(f"{mode} {dtype} failed: {reason}", file=sys.stderr)
                print(stderr[-3000:] if stderr.strip() else "(the mode wrote nothing to stderr)", file=sys.stderr,
                      flush=True)
                failures.append(f"{mode} {dtype}: {reason}")
                continue
            rows.append(row)
    if not rows:
        sys.exit("no mode ran to the end" + "".join(f"\n  {f}" for f in failures))
    dtypes = [d for d in dtypes if any(r["dtype"] == d for r in rows)]
    sticks = print_tables(args, rows, failures, dtypes)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "yardstick": sticks, "failures": failures}, indent=2))
    if failures:
        sys.exit(1)


def main_sharded(args) -> None:
    """--fsdp: one torchrun child per (rank count, engine, mode, dtype); the table of bench_sharded.py."""
    from bench_sharded import print_sharded_table, torchrun_command

    rows, failures = [], []
    for ranks in [int(r) for r in args.ranks.split(",")]:
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                for engine in args.engines.split(","):
                    print(f"running {engine} x {ranks} {mode} {dtype} ...", file=sys.stderr, flush=True)
                    cmd = torchrun_command(child_command(args, mode, dtype), ranks, engine)
                    row, failure = run_child(cmd, args.timeout)
                    if failure:
                        print(f"{engine} x {ranks} failed: {failure[0]}\n{failure[1][-3000:]}", file=sys.stderr)
                        failures.append(f"{engine} x {ranks} {mode} {dtype}: {failure[0]}")
                    else:
                        rows.append(row)
                        print(f"  {json.dumps(row)}", file=sys.stderr, flush=True)
                    # (after every child: a bench stopped half-way keeps what it measured)
                    if args.json_out:
                        Path(args.json_out).write_text(json.dumps({"rows": rows, "failures": failures}, indent=2))
    print_sharded_table(args, rows, failures)
    if failures or not rows:
        sys.exit(1)


def print_tables(args, rows: list[dict], failures: list[str], dtypes: list[str]) -> dict[str, float]:
    """Print the figures of every (mode, dtype) that ran and the ratios between modes; return the yardsticks."""
    import torch
    import transformers

    sticks = {d: statistics.median(r["yardstick"] for r in rows if r["dtype"] == d) for d in dtypes}
    by = {(r["mode"], r["dtype"]): r for r in rows}
    machine = f"{cpu_description()}, {os.cpu_count()} cores"
    if args.device == "cuda":
        machine = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    lengths = f"all {args.seq_len} tokens" if args.seq_len else ("--data_file" if args.data_file else "WikiText-like")
    for flag in ("compile", "no_cudnn_sdp"):
        if getattr(args, flag):
            lengths += f"; --{flag}"
    for flag in ("pad_to_multiple_of", "head_align"):
        if getattr(args, flag) is not None:
            lengths += f"; --{flag} {getattr(args, flag)}"
    print(f"\n## bench_train_step --preset {args.preset} ({args.device}; {machine}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; sequences {lengths}; {time.strftime('%Y-%m-%d')})\n")
    print("yardstick (median over the modes; each mode's utilisation uses its own, timed between its steps): "
          + ", ".join(f"{d} {v / 1e12:.3f} TFLOP/s" for d, v in sticks.items())
          + "".join(f" (datasheet dense bf16 peak {r['datasheet_peak'] / 1e12:.0f} TFLOP/s)"
                    for r in rows[:1] if r.get("datasheet_peak")) + "\n")
    print("| mode | dtype | median step (s) | seq/s | real tok/s | peak mem (GiB) | GiB per 1k tok | GFLOP/token "
          "| util | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        util = r["flop_s"] / r["yardstick"]
        print(f"| {r['mode']} | {r['dtype']} | {r['median_step_s']:.3f} | {r['seq_s']:.1f} | {r['tok_s']:.0f} | "
              f"{r['peak_gib']:.2f} | {r.get('peak_gib_per_ktok', float('nan')):.3f} | {r['gflop_per_token']:.3f} | "
              f"{util:.0%} | "
              f"{r['mean_loss']:.3f} |")
    searched = [r for r in rows if r.get("max_batch")]
    if searched:
        print("\n| mode | dtype | largest batch that fits | sequence length | peak mem (GiB) | GiB per 1k tok "
              "| first batch out of memory |")
        print("|---|---|---|---|---|---|---|")
        for r in searched:
            m = r["max_batch"]
            per = f"{m['peak_gib_per_ktok']:.3f}" if m["peak_gib_per_ktok"] else "-"
            peak = f"{m['peak_gib']:.1f}" if m["peak_gib"] else "-"
            print(f"| {r['mode']} | {r['dtype']} | {m['largest']} | {m['seq_len']} | {peak} | {per} | "
                  f"{m['first_failure'] or 'none up to 8192'} |")
    print("\n| ratio | measured (tok/s) | measured, each mode's tok/s over its yardstick | FLOP-count prediction |")
    print("|---|---|---|---|")
    for dtype in dtypes:
        pairs = [("diito_shared", "diito_plain", "shared prefix speed-up over plain"),
                 ("kd", "diito_shared", "standard KD over DIITO shared prefix"),
                 ("kd", "diito_plain", "standard KD over DIITO plain"),
                 ("kd", "kd_on_policy", "standard KD over KD on the student's samples")]
        for fast, slow, label in pairs:
            if (fast, dtype) in by and (slow, dtype) in by:
                a, b = by[(fast, dtype)], by[(slow, dtype)]
                normalised = (a["tok_s"] / a["yardstick"]) / (b["tok_s"] / b["yardstick"])
                print(f"| {label} ({dtype}) | {a['tok_s'] / b['tok_s']:.2f}x | {normalised:.2f}x | "
                      f"{b['gflop_per_token'] / a['gflop_per_token']:.2f}x |")
        if ("diito_shared", "fp32") in by and ("diito_shared", "bf16") in by and dtype == "bf16":
            a, b = by[("diito_shared", "bf16")], by[("diito_shared", "fp32")]
            print(f"| bf16 over fp32 (diito_shared) | {a['tok_s'] / b['tok_s']:.2f}x | - | - |")
    if failures:
        print("\nfailed modes (not in the tables):\n" + "\n".join(f"- {f}" for f in failures))
    return sticks


if __name__ == "__main__":
    main()
