"""Checkpoint folders and data fingerprints: listing, manifests, verification, the training-state file.

A checkpoint is `checkpoint-<step>/` in the dump path: the student (an HF folder), `training_state.pt`
and `manifest.json` (size and blake2b of every other file, written last). `CausalDistiller` writes
them; `causal_train.py` picks the one to resume from.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from binarized_io import HEADER_SIZE
from utils import CliError, atomic_write_text, file_blake2b, logger

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"

# The bytes a data file's full checksum covers: everything after the .bin header (the header's own
# fields are checked by the reader), so the same digest is the one binarized_io records in the header.
FULL_CHECKSUM_FROM = HEADER_SIZE


def file_fingerprint(path, full: bool = True) -> dict:
    """Size, a sha256 of the first and last MiB (cheap) and, with `full`, a blake2b of the whole file after
    byte 4096 (one read of the file: about 2 s per GB on a small CPU)."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 1 << 20:
            fh.seek(max(size - (1 << 20), 1 << 20))
            digest.update(fh.read())
    out = {"size": size, "sha256_head_tail": digest.hexdigest()}
    if full:
        out["blake2b_from_4096"] = file_blake2b(path, skip=FULL_CHECKSUM_FROM)
    return out


def check_fingerprint(path, recorded: dict | None, now: dict | None = None) -> None:
    """Raise CliError if `path` no longer matches the fingerprint recorded when the run started.

    Compares the entries both fingerprints hold: size and head/tail always (cheap: at every epoch),
    the full checksum when `now` carries it (at start-up and on --resume). `now` is computed cheaply when not given.
    """
    if recorded is None:
        return
    try:
        now = now if now is not None else file_fingerprint(path, full=False)
    except OSError as err:
        raise CliError(f"--data_file {path} can no longer be read: {err}") from None
    common = sorted(set(now) & set(recorded))
    if any(now[k] != recorded[k] for k in common):
        raise CliError(f"--data_file {path} changed while the run used it (recorded {recorded}, now {now}); "
                       f"restore the original file or start a new run")


def list_checkpoints(dump_path: Path) -> list[Path]:
    """Complete checkpoints in `dump_path`, oldest first (a folder without its state file is skipped)."""
    found = []
    for child in Path(dump_path).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = child.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and (child / STATE_FILE).is_file() and (child / "model.safetensors").is_file():
            found.append((int(suffix), child))
    return [c for _, c in sorted(found)]


def save_training_state(state: dict, path: Path) -> None:
    """torch.save through a Python file object, so that a full disk surfaces as OSError(ENOSPC) (as the
    cause of torch's RuntimeError) instead of a bare "file write failed"."""
    with open(path, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())


def write_manifest(folder: Path) -> None:
    """`manifest.json` in `folder`: size and blake2b of every other file (written last: it seals the folder)."""
    files = {f.name: {"size": f.stat().st_size, "blake2b": file_blake2b(f)}
             for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != MANIFEST_FILE}
    atomic_write_text(Path(folder) / MANIFEST_FILE, json.dumps({"files": files}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """What is wrong with checkpoint `folder` (a missing, truncated or altered file), or None when it is sound.

    Checks the manifest's size and checksum of every file. A checkpoint written before manifests
    existed is accepted with a warning (its files are then only checked when loaded).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    for name in (STATE_FILE, "model.safetensors"):
        if not (folder / name).is_file():
            return f"{name} is missing"
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        logger.warning("checkpoint %s has no %s (written by an older version): not verified", folder, MANIFEST_FILE)
        return None
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_FILE} is unreadable ({err})"
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']} (truncated or replaced)"
        if file_blake2b(path) != entry["blake2b"]:
            return f"{name}: checksum differs from the manifest (the file was altered or corrupted)"
    return None


def find_resume_checkpoint(dump_path: Path) -> Path:
    """The newest sound checkpoint in `dump_path`; each newer damaged or incomplete one is named in a warning.

    Raises CliError when there is none.
    """
    candidates = []
    for child in Path(dump_path).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = child.name[len(CHECKPOINT_PREFIX):]
        if suffix.isdigit() and child.is_dir():
            candidates.append((int(suffix), child))
    skipped = []
    for _, folder in sorted(candidates, reverse=True):
        problem = checkpoint_problem(folder)
        if problem is None:
            if skipped:
                logger.warning("resuming from %s, the newest sound checkpoint (skipped: %s)", folder, "; ".join(skipped))
            return folder
        logger.warning("checkpoint %s is damaged or incomplete: %s", folder, problem)
        skipped.append(f"{folder.name}: {problem}")
    detail = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    raise CliError(f"--resume: no complete checkpoint in {dump_path}{detail}")


def folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
