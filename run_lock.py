"""One run at a time in an output folder: an exclusive lock beside it that names its holder."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from pathlib import Path

from utils import CliError, logger, write_error_message


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
