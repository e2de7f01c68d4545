"""What the quickstart's numbers depend on besides its inputs: the package versions and the CPU's kernels.

The same command gives the same numbers only with the same packages and the same arithmetic. So:

- `constraints.txt` pins the versions the documented numbers were measured with (requirements.txt
  applies it); `version_warnings` names every package the report should warn about;
- on x86-64, every command runs with PINNED_KERNELS: PyTorch's own kernels at their AVX2 level and
  MKL's conditional numerical reproducibility at AVX2, strict. Left alone, both pick their code path
  by CPU (AVX-512 on one machine, AVX2 on another) and the sums come out in another order; training
  amplifies that into other figures (docs/quickstart.md measures how much). Pinned, the forward and
  backward passes gave the same bits on an AMD EPYC and an Intel Xeon (bench/kernel_digests.py);
  the unfused AdamW step did not: its float32 sqrt goes through MKL's vector math, correctly rounded
  on the Intel CPU with the pin, not on the AMD one with or without it.
"""
from __future__ import annotations

import importlib.metadata as metadata
import platform
import subprocess
import sys

from utils import REPO_ROOT

PINNED_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT"}
# the packages whose versions move the numbers (the model code, its arithmetic, the tokenizer, the statistics)
NUMERIC_PACKAGES = ("torch", "transformers", "tokenizers", "numpy", "scipy", "safetensors")
CONSTRAINTS = REPO_ROOT / "constraints.txt"


def kernel_env() -> dict[str, str]:
    """The environment that pins the CPU kernels (x86-64 only: elsewhere there is no AVX2 to pin to)."""
    return dict(PINNED_KERNELS) if platform.machine().lower() in ("x86_64", "amd64") else {}


def documented_versions(path=CONSTRAINTS) -> dict[str, str]:
    """The `name==version` pins of constraints.txt, by lower-case name ({} when the file is missing)."""
    pins = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return pins
    for line in lines:
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def installed_versions(names=NUMERIC_PACKAGES) -> dict[str, str | None]:
    """Each package's installed version without its local label (`2.13.0+cpu` -> `2.13.0`); None: not installed."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def version_warnings(installed: dict[str, str | None], documented: dict[str, str]) -> list[str]:
    """One sentence per package whose installed version is not the documented one."""
    return [f"{name} {version or 'not installed'} is installed, the documented numbers were measured with "
            f"{documented[name.lower()]}" for name, version in installed.items()
            if name.lower() in documented and version != documented[name.lower()]]


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux; the platform's word elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_level(env: dict[str, str]) -> str:
    """The CPU kernel level PyTorch uses in a command run with `env` (asked of a fresh interpreter)."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                             env=env, capture_output=True, text=True, timeout=120, check=True)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(env: dict[str, str]) -> dict:
    """What the report records: versions, the CPU, its kernel level under `env`, the pins and any warnings."""
    installed = installed_versions()
    documented = documented_versions()
    pinned = {k: env[k] for k in PINNED_KERNELS if k in env}
    return {"python": platform.python_version(), "packages": installed, "cpu": cpu_name(),
            "machine": platform.machine(), "kernels": kernel_level(env), "pinned": pinned,
            "warnings": version_warnings(installed, documented)
            + ([] if pinned or not kernel_env() else
               ["the CPU kernels are the CPU's own (--cpu_kernels native), not the pinned AVX2 ones"])}
