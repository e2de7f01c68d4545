"""The machine side of the benchmarks: the yardstick of achieved FLOP/s, the CPU's description, a child's
exit status in words (bench_train_step.py and bench_sharded.py)."""
from __future__ import annotations

import platform
import signal
import statistics
import time
from pathlib import Path

# H100 SXM / H200 bf16 dense peak (FLOP/s); other GPUs fall back to a measured matmul.
GPU_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class Yardstick:
    """Achieved FLOP/s of the device's matrix units: a large matmul of the mode's precision, measured.

    `sample()` times one batch of matmuls (2048^3 on the CPU; 8192^3 on CUDA, timed with CUDA
    events after three warm-ups); `value()` is the median of the samples. `datasheet` is the dense
    bf16 peak of known GPUs, reported beside the measurement, never used in its place.
    """

    def __init__(self, device: str, dtype: str):
        import torch

        self.device, self.datasheet, self.samples = device, None, []
        if device == "cuda":
            name = torch.cuda.get_device_name()
            self.datasheet = next((p for key, p in GPU_BF16_PEAK.items() if key in name and dtype == "bf16"), None)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
        self.n = 8192 if device == "cuda" else 2048

    def sample(self, reps: int | None = None) -> None:
        import torch

        if reps is None:  # about 0.1-0.2 s per sample on a small CPU (bf16 matmuls run faster)
            reps = 3 if self.dtype == torch.float32 else 12
        # Allocated per sample, so that the matrices are not part of the step's peak memory.
        gen = torch.Generator(device=self.device).manual_seed(len(self.samples))
        a = torch.randn(self.n, self.n, dtype=self.dtype, device=self.device, generator=gen)
        b = torch.randn(self.n, self.n, dtype=self.dtype, device=self.device, generator=gen)
        if self.device == "cuda":
            for _ in range(3):
                a @ b
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                a @ b
            end.record()
            end.synchronize()
            self.samples.append(2 * self.n**3 * 10 / (start.elapsed_time(end) / 1e3))
            return
        a @ b  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        self.samples.append(2 * self.n**3 * reps / (time.perf_counter() - start))

    def value(self) -> float:
        if not self.samples:
            self.sample()
        return statistics.median(self.samples)


def cpu_description() -> str:
    """The CPU's model name and the bf16-relevant flags it has (the bf16 figures depend on them)."""
    from devices import BF16_CPU_FLAGS, cpu_flags

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
