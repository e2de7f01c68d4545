"""Checkpoints of a distillation run: writing, pruning, disk space, verification, loading, RNG state.

A checkpoint is `checkpoint-<step>/` in the dump path: the student (an HF folder), `training_state.pt`
(one dictionary with everything a continuation needs, the RNG state of every rank included) and
`manifest.json` (size and blake2b of every other file, written last). An --fsdp run writes sharded
checkpoints instead (`sharded_checkpoints.py`: DCP shards and `.metadata` in place of the HF
folder, the same state file and manifest), which the functions here list and verify alike. `CheckpointWriter` writes
them (and the final student) for `CausalDistiller`, `read_checkpoint` verifies and loads one, and
`causal_train.py` picks the one to resume from (`find_resume_checkpoint`). The data file's
fingerprint, recorded in the state, ties a checkpoint to its corpus.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from binarized_io import HEADER_SIZE
from atomic_files import atomic_dir, atomic_write_text, file_blake2b
from utils import CliError, is_disk_full, logger

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"
MANIFEST_FILE = "manifest.json"
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards: marks a sharded checkpoint

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
        if suffix.isdigit() and all((child / name).is_file() for name in required_files(child)):
            found.append((int(suffix), child))
    return [c for _, c in sorted(found)]


def is_sharded_checkpoint(folder: Path) -> bool:
    """True for a checkpoint of an --fsdp run (DCP shards, `sharded_checkpoints.py`)."""
    return (Path(folder) / DCP_METADATA).is_file()


def required_files(folder: Path) -> tuple[str, ...]:
    """The files a complete checkpoint `folder` holds besides its manifest: the state and the weights (the
    HF folder's, or DCP's index of the shards, whose files the manifest lists)."""
    return (STATE_FILE, DCP_METADATA if is_sharded_checkpoint(folder) else "model.safetensors")


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

    A checkpoint is sealed by its `manifest.json` (written last): a folder without one, or with one
    that does not list the state and the weights with a size and a checksum each, is damaged (an
    interrupted write, a file removed, or a folder put together by hand); so is a file whose size
    or checksum differs from its entry.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "no such folder"
    for name in required_files(folder):
        if not (folder / name).is_file():
            return f"{name} is missing"
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return (f"{MANIFEST_FILE} is missing (it is written last and seals the checkpoint: the write was interrupted, "
                f"the file was removed, or the checkpoint is from a version before manifests)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{MANIFEST_FILE} is unreadable ({type(err).__name__}: {err})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return f'{MANIFEST_FILE} is malformed (no "files" object of name -> size and checksum)'
    for name in required_files(folder):  # (the state and the weights: the HF folder's, or DCP's index)
        if name not in files:
            return f"{MANIFEST_FILE} does not list {name}"
    if is_sharded_checkpoint(folder):  # every rank's shard is sealed too: one the manifest does not list is unchecked
        unlisted = sorted(p.name for p in folder.glob("*.distcp") if p.name not in files)
        if unlisted:
            return f"{MANIFEST_FILE} does not list {', '.join(unlisted)}"
    for name, entry in files.items():
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            return f"{MANIFEST_FILE} is malformed (file name {name!r})"
        if (not isinstance(entry, dict) or type(entry.get("size")) is not int
                or not isinstance(entry.get("blake2b"), str)):
            return f"{MANIFEST_FILE} is malformed (the entry of {name} is not {{\"size\": int, \"blake2b\": str}})"
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
    """Bytes of the files directly in `folder`."""
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())


# --- writing -----------------------------------------------------------------------------------------
class CheckpointWriter:
    """Writes `checkpoint-<step>/` folders and the final student into `dump_path` (the master rank's job).

    With `save_total_limit` > 0 only the newest that many checkpoints are kept. Checkpoints that the
    limit would remove anyway are removed first, oldest first, when the disk lacks room for a new
    one; the newest complete checkpoint is never removed before its successor exists. A full disk
    or another write error is a CliError naming the target and the intact previous checkpoint.
    """

    def __init__(self, dump_path: Path, save_total_limit: int = 0):
        self.dump_path = Path(dump_path)
        self.save_total_limit = save_total_limit

    def write(self, step: int, student, state: dict) -> Path:
        """Write `checkpoint-<step>/` atomically: the student (HF folder), `state`, then the manifest."""
        target = self.dump_path / f"{CHECKPOINT_PREFIX}{step}"
        self._make_room()
        for attempt in (1, 2):
            try:
                self._write(target, student, state)
                break
            except Exception as err:  # noqa: BLE001 -- safetensors and torch report write errors their own ways
                if attempt == 1 and is_disk_full(err) and self._remove_excess("the disk is full"):
                    continue
                raise self._write_error(target, err) from None
        logger.info("checkpoint written: %s", target)
        return target

    def prune(self) -> None:
        """Remove the checkpoints beyond the newest `save_total_limit`."""
        limit = self.save_total_limit
        if limit and limit > 0:
            for old in list_checkpoints(self.dump_path)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)

    def write_final(self, student) -> None:
        """The student as a plain HF model folder in `dump_path` (config.json + model.safetensors)."""
        # Each file lands complete: written in a hidden folder, then renamed into place.
        tmp = Path(tempfile.mkdtemp(prefix=".final.", suffix=".tmp", dir=self.dump_path))
        try:
            student.save_pretrained(tmp, safe_serialization=True)
            for f in sorted(tmp.iterdir()):
                os.replace(f, self.dump_path / f.name)
        except Exception as err:  # noqa: BLE001
            raise self._write_error(self.dump_path / "model.safetensors", err) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("student saved to %s", self.dump_path)

    def write_snapshot(self, student, step: int) -> Path:
        """The student as a plain HF model folder, `snapshots/step_<step>` (replaced whole if a resumed run writes it
        again)."""
        target = self.dump_path / "snapshots" / f"step_{step}"
        try:
            with atomic_dir(target) as tmp:
                student.save_pretrained(tmp, safe_serialization=True)
        except CliError:
            raise
        except Exception as err:  # noqa: BLE001
            raise self._write_error(target, err) from None
        return target

    def _write(self, target: Path, student, state: dict) -> None:
        with atomic_dir(target) as tmp:
            student.save_pretrained(tmp, safe_serialization=True)
            save_training_state(state, tmp / STATE_FILE)
            write_manifest(tmp)

    def _write_error(self, target: Path, err: BaseException) -> CliError:
        found = list_checkpoints(self.dump_path)
        if found:
            previous = f"the previous checkpoint {found[-1]} is intact"
            then = f"resume with --resume (it continues from {found[-1]})"
        else:
            previous, then = "no checkpoint was written before", "run the command again (there is nothing to resume)"
        if is_disk_full(err):
            return CliError(f"no space left on device at {target}; {previous}; free space and {then}")
        return CliError(f"could not write {target}: {type(err).__name__}: {err} ({previous}; then {then})")

    def _excess(self) -> list[Path]:
        """Checkpoints that --save_total_limit removes once the next one is written (never the newest)."""
        limit = self.save_total_limit
        if not limit or limit <= 0:
            return []
        found = list_checkpoints(self.dump_path)
        return found[: max(0, len(found) - max(limit - 1, 1))]

    def _remove_excess(self, why: str, need: int | None = None) -> bool:
        removed = False
        for old in self._excess():  # oldest first
            if need is not None and shutil.disk_usage(self.dump_path).free >= need:
                break
            logger.warning("removing %s before writing the next checkpoint (--save_total_limit %d): %s", old,
                           self.save_total_limit, why)
            shutil.rmtree(old, ignore_errors=True)
            removed = True
        return removed

    def _make_room(self) -> None:
        """Free the checkpoints beyond --save_total_limit first when the disk may lack room for a new one."""
        found = list_checkpoints(self.dump_path)
        if not found or not self._excess():
            return
        need = folder_size(found[-1]) * 11 // 10 + (1 << 20)
        if shutil.disk_usage(self.dump_path).free < need:
            self._remove_excess("the disk is short of space", need)


# --- loading -----------------------------------------------------------------------------------------
# What a training state may hold besides tensors and Python containers of numbers and strings: NumPy
# arrays of numbers (NumPy's generator state, the epoch's pairing). `torch.load(weights_only=True)`
# refuses every other global, so a crafted training_state.pt cannot run code (it fails to load).
def _numpy_array_globals() -> list:
    numeric = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
               np.float16, np.float32, np.float64)
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, *(type(np.dtype(t)) for t in numeric)]


# The entries of a training state and the type each must have (`state_problem` checks them).
STATE_FIELDS = {"optimizer": dict, "scheduler": dict, "scaler": dict, "epoch": int, "n_step": int,
                "batch_in_epoch": int, "n_tokens": int, "n_skipped_nonfinite": int, "world_size": int, "rng": list}


def load_training_state(path: Path) -> dict:
    """A `training_state.pt` read with `torch.load(weights_only=True)`: tensors, numbers, strings, containers and
    NumPy arrays of numbers, nothing else (no object is built, no code runs). Raises what torch.load raises."""
    with torch.serialization.safe_globals(_numpy_array_globals()):
        return torch.load(path, map_location="cpu", weights_only=True)


def state_problem(state, world_size: int | None = None, fields: dict | None = None) -> str | None:
    """What is wrong with a loaded training state (a missing entry, one of the wrong type), or None.
    `fields`: the entries and their types (default `STATE_FIELDS`; a sharded checkpoint's differ)."""
    fields = STATE_FIELDS if fields is None else fields
    if not isinstance(state, dict):
        return f"{STATE_FILE} holds a {type(state).__name__}, not a training state"
    missing = [k for k in fields if k not in state]
    if missing:
        return f"{STATE_FILE} lacks {', '.join(missing)}"
    for key, kind in fields.items():
        value = state[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool) or \
                (kind is int and value < 0):
            return f"{STATE_FILE}: {key} is {value!r:.60}, not a{'n' if kind is int else ''} {kind.__name__}" + \
                (" >= 0" if kind is int else "")
    rng = state["rng"]
    if world_size is not None and state["world_size"] == world_size and len(rng) != world_size:
        return f"{STATE_FILE} holds the RNG state of {len(rng)} processes for a world size of {world_size}"
    for entry in rng:
        if not isinstance(entry, dict) or any(k not in entry for k in ("python", "numpy", "torch")):
            return f"{STATE_FILE}: an RNG state lacks python, numpy or torch"
    return None


def read_checkpoint(folder: Path, student, data_file, data_fingerprint: dict | None) -> dict:
    """Verify checkpoint `folder`, load its weights into `student` and return its training state.

    The folder is checked against its manifest first (`checkpoint_problem`), the state is read with
    `weights_only=True` (`load_training_state`) and its entries checked (`state_problem`), and the data
    file against the fingerprint the run recorded; a damaged checkpoint, a changed data file or weights
    that do not fit the student are a CliError naming the culprit.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    problem = checkpoint_problem(folder)
    if problem:
        raise CliError(f"checkpoint {folder} is damaged: {problem}")
    try:
        state = load_training_state(folder / STATE_FILE)
    except Exception as err:  # noqa: BLE001 -- a damaged or crafted file gets one clear message
        raise CliError(f"checkpoint {folder} is damaged: cannot read {STATE_FILE} ({short_load_error(err)})") from None
    problem = state_problem(state)
    if problem:
        raise CliError(f"checkpoint {folder} is damaged: {problem}")
    try:
        weights = load_file(str(folder / "model.safetensors"), device="cpu")
    except Exception as err:  # noqa: BLE001 -- a damaged file gets one clear message
        raise CliError(f"checkpoint {folder} is damaged: cannot read model.safetensors "
                       f"({type(err).__name__}: {err})") from None
    recorded = state.get("data_fingerprint")
    if recorded is not None:
        if not isinstance(recorded, dict):
            raise CliError(f"checkpoint {folder} is damaged: {STATE_FILE}: data_fingerprint is not a dictionary")
        check_fingerprint(data_file, recorded, data_fingerprint)
    try:
        missing, unexpected = student.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shapes that differ
        raise CliError(f"checkpoint {folder} does not match the student: {str(err).splitlines()[0]}") from None
    tied = set(getattr(student, "_tied_weights_keys", None) or {})
    if unexpected or [k for k in missing if k not in tied]:
        raise CliError(f"checkpoint {folder} does not match the student: missing {missing}, unexpected {unexpected}")
    return state


def short_load_error(err: BaseException) -> str:
    """torch.load's error in one line: for a file that weights_only loading refuses, the global it refused
    (torch's own message is several paragraphs of advice to load it unrestricted, which is not ours to give)."""
    import re

    text = str(err)
    if "Weights only load failed" in text:
        found = re.search(r"(?:Unsupported global: GLOBAL |unsupported GLOBAL |got <class ')([\w.]+)", text)
        what = f"it needs {found.group(1)}" if found else "it holds more than tensors and plain data"
        return f"refused by weights-only loading: {what}, which a checkpoint of this project never holds"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(err).__name__}: {first}"[:300]


# --- random number generators ------------------------------------------------------------------------
def rng_state() -> dict:
    """The state of every generator a run draws from (Python, NumPy, torch, CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def rng_states_all_ranks(multi_gpu: bool) -> list[dict]:
    """`rng_state()` of every rank, in rank order (a collective under DDP)."""
    mine = rng_state()
    if not multi_gpu:
        return [mine]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def set_rng_state(state: dict) -> None:
    """Restore the generators from a `rng_state()`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
