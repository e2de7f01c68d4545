"""What both pipelines (quickstart and reproduce) share: how a stage fails or is interrupted, the
environment their commands run in, the fingerprint that keys a finished stage, durations, and the rules of
their output folder (a folder of their own, one pipeline in it at a time, no input inside it)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from run_lock import RunLock
from utils import CliError

# The variables that keep every library off the model and dataset hubs.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Set for every command a pipeline starts: no tokenizer threads fighting the trainer's, no wandb, output
# as it comes (the pipeline reads it for progress).
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "PYTHONUNBUFFERED": "1"}


class StageFailed(Exception):
    """A command of a pipeline exited with an error, or a stage did not leave what it should have."""


class Interrupted(Exception):
    """A stop signal (SIGTERM, Ctrl-C) asked the pipeline to stop; `signum` is the signal, when known."""

    def __init__(self, signum: int | None = None):
        super().__init__(signum)
        self.signum = signum


def fingerprint(settings) -> str:
    """A short stable hash of a JSON-able object: a stage's settings (upstream fingerprints included)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def format_seconds(seconds: float, compact: bool = False) -> str:
    """A duration for people: "42 s", "26 min 46 s", "1 h 17 min"; `compact` (a table's cell): "42 s",
    "26.8 min", "1.28 h". Each unit is chosen after rounding, so never "60 s", "1 min 60 s" or "60.0 min"."""
    if compact:
        if round(seconds) < 60:
            return f"{seconds:.0f} s"
        if round(seconds / 60, 1) < 60:
            return f"{seconds / 60:.1f} min"
        return f"{seconds / 3600:.2f} h"
    seconds = int(round(float(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def check_out(out: Path, manifest: str, tool: str, command: str, legacy: Callable[[Path], bool] | None = None
              ) -> dict | None:
    """The manifest of a pipeline's --out, None when the folder is new or empty (or `legacy` recognises it as
    made by an older version); CliError when it holds anything else. A pipeline writes into, and deletes
    stage folders of, only a folder of its own: never the user's files."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a folder")
    if not out.exists() or not any(out.iterdir()):
        return None
    path = out / manifest
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        if legacy is not None and legacy(out):
            return None
        raise CliError(f"--out {out} is not empty and holds no {manifest}: it is not a folder of {command}; "
                       f"choose another --out (a new or empty folder)") from None
    except (OSError, ValueError) as err:
        raise CliError(f"--out {out}: cannot read {path} ({err}); choose another --out") from None
    if not isinstance(record, dict) or record.get("tool") != tool:
        raise CliError(f"--out {out}: {path} was not written by {command}; choose another --out")
    return record


def lock_out(out: Path) -> RunLock:
    """One pipeline per --out at a time: the lock beside the folder, held until the process ends (or `release`)."""
    return RunLock(out, "--out").acquire()


def check_inputs_outside(out: Path, inputs: list[tuple[str, str]]) -> None:
    """CliError when an input ((flag, path) of `inputs`) lies inside --out, where a redone stage may replace it."""
    out = out.resolve()
    for flag, value in inputs:
        path = Path(value).expanduser().resolve()
        if path == out or out in path.parents:
            raise CliError(f"{flag} {value} lies inside --out {out}, whose stage folders the pipeline replaces when "
                           f"it redoes a stage: keep inputs outside --out")
