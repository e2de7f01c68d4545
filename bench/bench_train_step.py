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
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PRESETS = {
    # The reference configuration: teacher 6 x 256, student 3 x 256, vocabulary 30,522, batch 16.
    "tiny": dict(t_layers=6, s_layers=3, hidden=256, heads=4, ffn=1024, vocab=30522, batch=16, max_len=512,
                 t_site=3, s_site=1),
    # BERT-base teacher -> 6-layer DistilBERT student, batch 40, lengths up to 512.
    "base": dict(t_layers=12, s_layers=6, hidden=768, heads=12, ffn=3072, vocab=30522, batch=40, max_len=512,
                 t_site=6, s_site=3),
    # Causal LMs: a Llama teacher 6 x 256 (4 query heads, 2 key/value heads) -> a 3-block Llama
    # student, Llama-2's vocabulary of 32,000, batch 16; losses ce + clm (no masking).
    "tiny_clm": dict(t_layers=6, s_layers=3, hidden=256, heads=4, kv_heads=2, ffn=1024, vocab=32000, batch=16,
                     max_len=512, t_site=3, s_site=1, family="llama"),
}
# Special ids of the synthetic data: BERT's [CLS] [SEP] [PAD] [UNK] [MASK]; Llama's <s> </s> (pad 0).
SPECIAL_IDS = {
    "bert": {"mask_token": 103, "pad_token": 0, "cls_token": 101, "sep_token": 102, "unk_token": 100},
    "llama": {"pad_token": 0, "cls_token": 1, "sep_token": 2, "unk_token": 0},
}
MODES = {
    "kd": dict(alpha_causal_ce=0.0, no_shared_prefix=False),
    "diito_plain": dict(alpha_causal_ce=0.25, no_shared_prefix=True),
    "diito_shared": dict(alpha_causal_ce=0.25, no_shared_prefix=False),
}
# H100 SXM / H200 bf16 dense peak (FLOP/s); other GPUs fall back to a measured matmul.
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def _synthetic_sequences(n: int, vocab: int, seed: int, first: int = 101, last: int = 102):
    """Lengths like the WikiText fixture (log-normal, mean about 62, 12..466 tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(mean=3.8, sigma=0.8, size=n).astype(int), 12, 466)
    seqs = []
    for length in lengths:
        body = rng.integers(1000, vocab, size=length - 2)
        seqs.append(np.concatenate([[first], body, [last]]).astype(np.uint16))
    return seqs


def _models(cfg, seed=0):
    import torch
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(seed)
    if cfg.get("family") == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        common = dict(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_attention_heads=cfg["heads"],
                      num_key_value_heads=cfg["kv_heads"], intermediate_size=cfg["ffn"],
                      max_position_embeddings=cfg["max_len"], tie_word_embeddings=False)
        return (LlamaForCausalLM(LlamaConfig(num_hidden_layers=cfg["t_layers"], **common)),
                LlamaForCausalLM(LlamaConfig(num_hidden_layers=cfg["s_layers"], **common)))
    teacher = BertForMaskedLM(BertConfig(
        vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], num_hidden_layers=cfg["t_layers"],
        num_attention_heads=cfg["heads"], intermediate_size=cfg["ffn"], max_position_embeddings=512,
    ))
    student = DistilBertForMaskedLM(DistilBertConfig(
        vocab_size=cfg["vocab"], dim=cfg["hidden"], n_layers=cfg["s_layers"], n_heads=cfg["heads"],
        hidden_dim=cfg["ffn"], max_position_embeddings=512, sinusoidal_pos_embds=False,
    ))
    return teacher, student


def run_single(args) -> dict:
    """One (mode, dtype) in this process; returns its figures."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from utils import count_cpu_flash_attention, tune_cpu_allocator

    tune_cpu_allocator()  # as causal_train.py does
    count_cpu_flash_attention()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PRESETS[args.preset]
    device = torch.device(args.device)
    mlm = cfg.get("family") is None
    ids = SPECIAL_IDS["bert" if mlm else cfg["family"]]
    dataset = _dataset(args, cfg, ids)
    distiller = _distiller(args, cfg, device, dataset, ids, mlm)
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
        losses = distiller.step([batch])
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
            distiller.step([batch])
        counted.append((counter.get_total_flops(), int(batch["base_lengths"].sum())))
    flops_per_token = sum(f for f, _ in counted) / sum(n for _, n in counted)
    median = statistics.median(times)
    tok_s = tokens / sum(times)
    return dict(
        mode=args.mode, dtype=args.dtype, median_step_s=median, seq_s=seqs / sum(times), tok_s=tok_s,
        peak_gib=peak, gflop_per_token=flops_per_token / 1e9, flop_s=flops_per_token * tok_s,
        mean_loss=statistics.mean(losses_seen), forwards=distiller.forward_counts, yardstick=stick.value(),
    )


def _dataset(args, cfg: dict, ids: dict):
    """The paired dataset of --data_file, or of synthetic sequences with WikiText-like lengths."""
    import numpy as np

    from lm_seqs_dataset import LmSeqsDataset

    data = _synthetic_sequences(2000, cfg["vocab"], 0, ids["cls_token"], ids["sep_token"])
    if args.data_file:
        from binarized_io import load_corpus

        corpus = load_corpus(args.data_file)
        data = [np.asarray(corpus[i]) for i in range(len(corpus))]
    dataset = LmSeqsDataset(data=data, max_model_input_size=cfg["max_len"], cls_id=ids["cls_token"],
                            sep_id=ids["sep_token"], pad_id=ids["pad_token"], unk_id=ids["unk_token"], seed=0,
                            paired=True)
    return dataset


def _distiller(args, cfg: dict, device, dataset, ids: dict, mlm: bool):
    """The distiller of one (mode, dtype), as causal_train.py builds it (`build_from_models`), on in-memory
    models and data; one full-width mapping entry at the preset's sites."""
    import torch

    from distill_setup import build_from_models
    from neuron_mapping import MappingEntry

    teacher, student = _models(cfg)
    params = train_args(args, cfg, mlm)
    params.__dict__.update(device=device, is_master=True, multi_gpu=False, world_size=1, global_rank=0,
                           special_tok_ids=ids)
    token_probs = None
    if mlm:
        token_probs = torch.ones(cfg["vocab"])
        token_probs[list(ids.values())] = 0
    t, s = cfg["t_site"], cfg["s_site"]
    hidden = cfg["hidden"]
    entry = MappingEntry(0, {t: tuple(range(hidden))}, {s: tuple(range(hidden))}, (), ())
    distiller = build_from_models(params, teacher, student, dataset, token_probs, [entry]).distiller
    student.train()
    return distiller


def train_args(args, cfg: dict, mlm: bool):
    """causal_train.py's arguments for a (mode, precision) of the benchmark: one step per batch, no warm-up.

    The models and data are made in memory (`build_from_models`): the paths given are not read."""
    from distill_setup import build_parser

    mode = MODES[args.mode]
    argv = ["--dump_path", args.tmp, "--data_file", args.data_file or "synthetic", "--teacher_name", "in-memory",
            "--student_config", "in-memory", "--teacher_type", "bert" if mlm else cfg["family"],
            "--student_type", "distilbert" if mlm else cfg["family"],
            "--alpha_ce", "0.5", "--alpha_mlm", "0.5" if mlm else "0.0", "--alpha_clm", "0.0" if mlm else "0.5",
            "--alpha_causal_ce", str(mode["alpha_causal_ce"]), "--gradient_accumulation_steps", "1",
            "--n_epoch", "1", "--seed", "0", "--batch_size", str(cfg["batch"]),
            "--max_model_input_size", str(cfg["max_len"]), "--learning_rate", "1e-4", "--warmup_prop", "0.0",
            "--num_workers", "0", "--log_interval", str(10**9), "--checkpoint_interval", "0", "--no_progress"]
    argv += ["--mlm"] * mlm + ["--bf16"] * (args.dtype == "bf16") + ["--compile"] * bool(args.compile)
    argv += ["--no_shared_prefix"] * mode["no_shared_prefix"]
    return build_parser().parse_args(argv)


class Yardstick:
    """Achieved FLOP/s of the device's matrix units: a large matmul (or the bf16 dense peak on known GPUs).

    `sample()` times one batch of matmuls; `value()` is the median of the samples.
    """

    def __init__(self, device: str, dtype: str):
        import torch

        self.device, self.peak, self.samples = device, None, []
        if device == "cuda":
            name = torch.cuda.get_device_name()
            self.peak = next((p for key, p in GPU_BF16_PEAK.items() if key in name and dtype == "bf16"), None)
        self.dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
        self.n = 4096 if device == "cuda" else 2048

    def sample(self, reps: int | None = None) -> None:
        import torch

        if self.peak is not None:
            return
        if reps is None:  # about 0.1-0.2 s per sample on a small CPU (bf16 matmuls run faster)
            reps = 12 if self.dtype == torch.bfloat16 else 3
        # Allocated per sample, so that the matrices are not part of the step's peak memory.
        a = torch.randn(self.n, self.n, dtype=self.dtype, device=self.device)
        b = torch.randn(self.n, self.n, dtype=self.dtype, device=self.device)
        a @ b  # warm-up
        if self.device == "cuda":
            reps *= 10
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.samples.append(2 * self.n**3 * reps / (time.perf_counter() - start))

    def value(self) -> float:
        if self.peak is not None:
            return self.peak
        if not self.samples:
            self.sample()
        return statistics.median(self.samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="Model sizes and batch size.")
    parser.add_argument("--data_file", default=None,
                        help="Binarized corpus to draw batches from (default: synthetic lengths like WikiText).")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="Where to run.")
    parser.add_argument("--modes", default="kd,diito_plain,diito_shared", help="Comma-separated modes.")
    parser.add_argument("--dtypes", default="fp32,bf16", help="Comma-separated precisions (fp32, bf16).")
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
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default="/tmp/bench_train_step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:  # child process
        print(json.dumps(run_single(args)))
        return

    dtypes = args.dtypes.split(",")
    if args.device == "cpu" and "bf16" in dtypes and not args.force_bf16:
        from utils import cpu_bf16_warning

        warning = cpu_bf16_warning()
        if warning:
            print(f"skipping the bf16 modes: {warning} (--force_bf16 runs them anyway)", file=sys.stderr, flush=True)
            dtypes.remove("bf16")
            if not dtypes:
                sys.exit("nothing to run: --dtypes named only bf16")
    rows, failures = [], []
    for dtype in dtypes:
        for mode in args.modes.split(","):
            cmd = [sys.executable, __file__, "--preset", args.preset, "--device", args.device, "--mode", mode,
                   "--dtype", dtype, "--steps", str(args.steps), "--warmup", str(args.warmup)]
            if args.data_file:
                cmd += ["--data_file", args.data_file]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.compile:
                cmd += ["--compile"]
            print(f"running {mode} {dtype} ...", file=sys.stderr, flush=True)
            failure = None
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
            except subprocess.TimeoutExpired as err:
                stderr = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
                failure = (f"timed out after {args.timeout:g} s (--timeout)", stderr)
            else:
                if out.returncode != 0:
                    failure = (describe_exit(out.returncode), out.stderr)
            if failure:
                reason, stderr = failure
                print(f"{mode} {dtype} failed: {reason}", file=sys.stderr)
                print(stderr[-3000:] if stderr.strip() else "(the mode wrote nothing to stderr)", file=sys.stderr,
                      flush=True)
                failures.append(f"{mode} {dtype}: {reason}")
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not rows:
        sys.exit("no mode ran to the end" + "".join(f"\n  {f}" for f in failures))
    dtypes = [d for d in dtypes if any(r["dtype"] == d for r in rows)]
    sticks = print_tables(args, rows, failures, dtypes)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "yardstick": sticks, "failures": failures}, indent=2))
    if failures:
        sys.exit(1)


def print_tables(args, rows: list[dict], failures: list[str], dtypes: list[str]) -> dict[str, float]:
    """Print the figures of every (mode, dtype) that ran and the ratios between modes; return the yardsticks."""
    import torch
    import transformers

    sticks = {d: statistics.median(r["yardstick"] for r in rows if r["dtype"] == d) for d in dtypes}
    by = {(r["mode"], r["dtype"]): r for r in rows}
    machine = f"{cpu_description()}, {os.cpu_count()} cores"
    if args.device == "cuda":
        machine = torch.cuda.get_device_name()
    print(f"\n## bench_train_step --preset {args.preset} ({args.device}; {machine}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; {time.strftime('%Y-%m-%d')})\n")
    print("yardstick (median over the modes; each mode's utilisation uses its own, timed between its steps): "
          + ", ".join(f"{d} {v / 1e12:.3f} TFLOP/s" for d, v in sticks.items()) + "\n")
    print("| mode | dtype | median step (s) | seq/s | real tok/s | peak mem (GiB) | GFLOP/token | util | loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        util = r["flop_s"] / r["yardstick"]
        print(f"| {r['mode']} | {r['dtype']} | {r['median_step_s']:.3f} | {r['seq_s']:.1f} | {r['tok_s']:.0f} | "
              f"{r['peak_gib']:.2f} | {r['gflop_per_token']:.3f} | {util:.0%} | {r['mean_loss']:.3f} |")
    print("\n| ratio | measured (tok/s) | measured, each mode's tok/s over its yardstick | FLOP-count prediction |")
    print("|---|---|---|---|")
    for dtype in dtypes:
        pairs = [("diito_shared", "diito_plain", "shared prefix speed-up over plain"),
                 ("kd", "diito_shared", "standard KD over DIITO shared prefix"),
                 ("kd", "diito_plain", "standard KD over DIITO plain")]
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


def cpu_description() -> str:
    """The CPU's model name and the bf16-relevant flags it has (the bf16 figures depend on them)."""
    from utils import BF16_CPU_FLAGS, cpu_flags

    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = cpu_flags() or set()
    known = [f for fs in BF16_CPU_FLAGS.values() for f in fs] + ["avx512f"]
    present = [f for f in known if f in flags]
    return (f"{name}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}; "
            f"flags {' '.join(present) if present else 'none of ' + ' '.join(known)}")


def describe_exit(returncode: int) -> str:
    """A child's exit status in words (a negative status is the signal that killed it)."""
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = " (the kernel's out-of-memory killer sends this)" if -returncode == signal.SIGKILL else ""
    return f"killed by {name}{hint}"


if __name__ == "__main__":
    main()
