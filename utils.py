"""What every command shares with the user: logging, `CliError` and `run_cli` (one message, exit status 2, no
traceback), checks of the paths a command reads and writes, the messages of a failed write, progress bars.

The rest of the plumbing has a module each: `atomic_files` (outputs written atomically), `devices`
(seeding, torchrun's process group, the CPU), `run_records` (arguments and commit of a run), `run_lock`
(one run per output folder)."""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Callable

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


