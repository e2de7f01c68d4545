"""Writing files and folders atomically: a crash or a full disk never leaves a half-written output under
its final name (a temporary beside it, fsynced, then renamed), and the temporaries a killed writer
left are cleaned at the next start."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from utils import CliError, logger, write_error, write_error_message


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
        _raise_temporary_error(err, path)
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
        _raise_temporary_error(err, path)
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(err, path)
        raise


def replace_folder(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` in the place of `path` (a sibling of it): an existing `path` is moved aside
    first and removed only once `tmp` is in its place, so a crash leaves the old folder or the new one, never a
    half. (What is left aside, `.<name>.old`, is removed by `clean_stale_temporaries`.)"""
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def _raise_temporary_error(err: OSError, path: Path) -> None:
    """No temporary can be made beside `path` (a full disk, no permission, or a folder that takes no new files,
    such as /proc): always the user's to fix, so a CliError naming `path`, never a traceback."""
    _raise_write_error(err, path)
    raise CliError(f"cannot write {path}: {err.strerror or err} (no file can be created in {path.parent})") from err


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


def file_blake2b(path: str | os.PathLike, skip: int = 0, chunk: int = 8 << 20) -> str:
    """Hex blake2b digest (16 bytes) of a file's bytes from offset `skip` on, read in `chunk`-byte blocks."""
    return file_digest(path, hashlib.blake2b(digest_size=16), skip, chunk)


def file_digest(path: str | os.PathLike, digest=None, skip: int = 0, chunk: int = 8 << 20) -> str:
    """Hex digest of a file's bytes from offset `skip` on with `digest` (a fresh hashlib object; SHA-256 when
    None), read in `chunk`-byte blocks."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as fh:
        fh.seek(skip)
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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
