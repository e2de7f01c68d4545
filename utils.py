"""Shared plumbing: logging, seeding, distributed set-up, run records, atomic writes, CLI errors."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

logging.basicConfig(
    format="%(asctime)s - %(levelname)s - %(name)s - PID: %(process)d - %(message)s",
    datefmt="%m/%d/%Y %H:%M:%S",
    level=logging.INFO,
)
logger = logging.getLogger("causal_distill")
# huggingface_hub and datasets print through handlers of their own and also pass each record up to
# the root handler configured above: every hub warning appeared twice. Their own handler stays.
for _library in ("huggingface_hub", "datasets"):
    logging.getLogger(_library).propagate = False

REPO_ROOT = Path(__file__).resolve().parent


class CliError(Exception):
    """A user-facing error: bad input, a missing file, an inconsistent configuration.

    Scripts let it propagate to `run_cli`, which logs the message (no traceback) and exits non-zero.
    The message must name the culprit (the file, flag or entry at fault).
    """


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's `main`, turning `CliError` into one clear message and exit status 2."""
    try:
        main()
    except CliError as err:
        logger.error("%s", err)
        sys.exit(2)
    except KeyboardInterrupt:
        logger.error("interrupted")
        sys.exit(130)
    except Exception as err:  # a full disk or a refused write is the user's to fix: one line, not a traceback
        found = write_error(err)
        if found is None:
            raise
        logger.error("%s", write_error_message(found))
        sys.exit(2)


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return `path` as a Path if it is a readable file (or folder), else raise CliError naming `what`."""
    p = Path(path)
    if not p.exists():
        raise CliError(f"{what}: {p} does not exist")
    if not os.access(p, os.R_OK):
        raise CliError(f"{what}: {p} is not readable")
    return p


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


def git_info(folder: str | os.PathLike = REPO_ROOT) -> dict:
    """The commit and branch of the checkout holding `folder`, read with the git CLI ({} outside git)."""

    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = _git("rev-parse", "HEAD")
    if sha is None:
        return {}
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"repo_sha": sha, "branch": _git("rev-parse", "--abbrev-ref", "HEAD"), "dirty": bool(dirty)}


def git_log(folder_path: str | os.PathLike) -> None:
    """Write `git_log.json` (commit, branch, dirty flag) into `folder_path`."""
    atomic_write_text(Path(folder_path) / "git_log.json", json.dumps(git_info(), indent=2))


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator:
    """Open a temporary file beside `path`; on success fsync and rename it onto `path`.

    On an exception the temporary file is removed and `path` is left as it was, so a crash never
    leaves a half-written file under the final name.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        _raise_write_error(err, path)
        raise
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
    try:
        with os.fdopen(fd, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _raise_write_error(err, path)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success replace `path` with it.

    An existing `path` is only removed after the new folder is complete. On an exception the
    temporary folder is deleted and `path` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as err:
        _raise_write_error(err, path)
        raise
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(err, path)
        raise


def _raise_write_error(err: BaseException, path: Path) -> None:
    """Raise a CliError naming `path` (chained to `err`) when `err` is a full disk or a refused write."""
    if isinstance(err, CliError):
        return
    found = write_error(err)
    if found is not None:
        raise CliError(write_error_message(found, path)) from err


@contextlib.contextmanager
def writing_into(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a full disk or a refused write inside the block into a CliError naming `what` `folder`, and remove
    the folders the block created, if it leaves them empty (nothing half-made is left behind)."""
    folder = Path(folder)
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        yield
    except BaseException as err:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
        if isinstance(err, CliError):
            raise
        found = write_error(err)
        if found is not None:
            raise CliError(f"{what} {folder}: {write_error_message(found)}") from err
        raise


def save_args(params, folder: str | os.PathLike, name: str = "parameters.json") -> None:
    """Record the run's arguments (JSON-serialisable fields only) and the git commit in `folder`."""
    record = {k: v for k, v in sorted(vars(params).items()) if _jsonable(v)}
    record["git"] = git_info()
    atomic_write_text(Path(folder) / name, json.dumps(record, indent=2))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


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


def file_blake2b(path: str | os.PathLike, skip: int = 0, chunk: int = 8 << 20) -> str:
    """Hex blake2b digest (16 bytes) of a file's bytes from offset `skip` on, read in `chunk`-byte blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        fh.seek(skip)
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_disk_full(err: BaseException) -> bool:
    """True when `err`, or an exception it was raised from, is a full disk (ENOSPC / "No space left on device").

    torch.save reports a failed write as a RuntimeError whose context is the OSError; safetensors as a
    SafetensorError whose message carries the OS error.
    """
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "os error 28" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def check_output_parent(path: str | os.PathLike, what: str, is_file: bool = True) -> Path:
    """Raise CliError when `path` cannot be written: a component of its parent is a file, or (with
    `is_file`) `path` itself is a folder. Returns `path` as a Path.

    Catches `--dump_path some_file/out` before any work is done, instead of a NotADirectoryError at the end.
    """
    path = Path(path)
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise CliError(f"{what} {path}: {parent} is a file, not a folder")
            break
    if is_file and path.is_dir():
        raise CliError(f"{what} {path} is a folder; give a file name")
    if not is_file and path.exists() and not path.is_dir():
        raise CliError(f"{what} {path} is a file, not a folder")
    return path


class _LineStream:
    """A stream for a progress bar whose output is not a terminal (a log file, a pipe): each refresh becomes one
    whole line. tqdm redraws its line with carriage returns and ends it only when it closes, so a log line
    written meanwhile ran into the bar's text in log files."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "\n").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*args, **kwargs):
    """tqdm on stderr; where stderr is not a terminal, one line per refresh (at most one every 5 s) instead of
    carriage-return redraws, so that log files stay one message per line (the counts `n/total` are still
    written, which the quickstart reads to show its own bar)."""
    from tqdm import tqdm

    stream = kwargs.pop("file", None) or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        stream = _LineStream(stream)
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), 5.0)
        kwargs["dynamic_ncols"] = False
        kwargs.setdefault("ncols", 100)
    return tqdm(*args, file=stream, **kwargs)


def line_mode_progress_bars_for_transformers() -> None:
    """HF's Trainer draws its bars with tqdm: in a log file, make them one line per refresh too (`progress_bar`)."""
    if sys.stderr.isatty():
        return
    import transformers.trainer_callback as callbacks

    callbacks.tqdm = progress_bar


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` if it exists, else its nearest existing parent folder."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor)


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """CliError naming `what` when `path` (a file or folder to write, existing or not) cannot be written: its
    folder, or the nearest existing folder above it, refuses new entries (permissions, a read-only file
    system, an immutable folder). Writes nothing. Returns `path` as a Path."""
    path = Path(path)
    target = nearest_existing(path)
    if target == path.absolute() and not target.is_dir():
        target = target.parent  # an existing file is replaced through its folder
    if not os.access(target, os.W_OK | os.X_OK):
        why = "a read-only file system" if _read_only_fs(target) else "no permission to write there"
        where = "" if target == path.absolute() else f": {target} cannot be written"
        raise CliError(f"{what} {path}{where} ({why})" if where else f"{what} {path} cannot be written ({why})")
    return path


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


# errno values of a write that failed for want of room or of permission: the user's to fix, not a bug.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def write_error(err: BaseException) -> OSError | None:
    """The OSError of a full disk or a refused write that `err` is, or was raised from (None otherwise)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in WRITE_ERRNOS:
            return err
        if "No space left on device" in str(err) or "os error 28" in str(err):
            return OSError(errno.ENOSPC, "No space left on device")
        err = err.__cause__ or err.__context__
    return None


def write_error_message(err: OSError, target: str | os.PathLike | None = None) -> str:
    """One line for a failed write: what could not be written and why."""
    where = target or err.filename
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "no space left on device" if err.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{why} while writing {where}: free space and run the command again" if where else \
            f"{why}: free space and run the command again"
    why = err.strerror or "write refused"
    if err.errno == errno.EROFS:
        why = "read-only file system"
    return f"cannot write {where}: {why}" if where else f"cannot write: {why}"


class RunLock:
    """An exclusive lock on an output folder, so that two runs never write into it at once.

    The lock is `flock` on `.<name>.lock` beside the folder (beside, not inside: `--force` moves the
    folder's contents aside), holding who took it (pid, host, start, command line). It is released,
    and the file removed, when the holder ends; a holder killed with `kill -9` releases it too (the
    kernel drops the lock with the process). flock covers the processes of one machine; on a shared
    (NFS) file system, runs on two machines may not see each other's lock.
    """

    def __init__(self, folder: str | os.PathLike, what: str):
        folder = Path(folder).absolute()
        self.folder, self.what = folder, what
        self.path = folder.with_name(f".{folder.name}.lock")
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock, or raise CliError naming the folder and whoever holds it."""
        import datetime as dt
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CliError(f"{self.what} {self.folder}: {write_error_message(err, self.path.parent)}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                logger.warning("%s %s: cannot take the lock %s (%s): two runs at once would not be prevented",
                               self.what, self.folder, self.path, err.strerror)
                return self
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise CliError(f"{self.what} {self.folder} is in use by another run ({holder}); wait for it to end "
                               f"or stop it (lock {self.path}, released when that process exits)") from None
            try:  # the file may have been removed by a holder that released it meanwhile: take the new one
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": dt.datetime.now().isoformat(timespec="seconds"), "command": _command_line()}
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
        except OSError as err:  # a full disk: the lock is not worth a run that could not write anything anyway
            self.release()
            raise CliError(f"{self.what} {self.folder}: {write_error_message(err, self.path)}") from None
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiting process then retries on a new file
        os.close(self.fd)
        self.fd = None


def _command_line() -> str:
    try:
        import psutil

        return " ".join(psutil.Process().cmdline())
    except Exception:  # noqa: BLE001 -- psutil missing or /proc unreadable: the script's own arguments
        return " ".join([sys.executable, *sys.argv])


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "a process that is starting"
    return (f"pid {info['pid']} on {info.get('host', '?')}, started {info.get('started', '?')}: "
            f"{info.get('command', '?')}")


def clean_stale_temporaries(folder: str | os.PathLike, prefix: str = "") -> list[Path]:
    """Remove the hidden `.{prefix}.*.tmp` files and folders (and `.{prefix}.*.old`) in `folder` (every
    hidden `.tmp` / `.old` entry when `prefix` is empty).

    They are what `atomic_open` / `atomic_dir` leave when a process is killed while writing. Call
    this only where no other process is writing the same outputs (at a run's start-up). Returns
    what was removed.
    """
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for child in folder.glob(f".{prefix}.*" if prefix else ".*"):
        if not (child.name.endswith(".tmp") or child.name.endswith(".old")):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                child.unlink()
        removed.append(child)
    if removed:
        logger.info("removed %d stale temporaries left by an interrupted write in %s: %s", len(removed), folder,
                    ", ".join(sorted(c.name for c in removed)))
    return removed
