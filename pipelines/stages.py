"""What both pipelines (quickstart and reproduce) share: how a stage fails or is interrupted, the
environment their commands run in, the fingerprint that keys a finished stage, and durations."""
from __future__ import annotations

import hashlib
import json

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
