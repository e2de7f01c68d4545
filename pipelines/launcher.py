"""Start the project's scripts as commands, optionally forked from a server that imported torch once.

Every command of the quickstart starts a Python that imports torch and transformers before it does
anything: about 3 CPU-seconds, most of a small command's cost (a `test`-preset quickstart runs
two dozen commands). With `preload`, commands are instead forked from a multiprocessing
*forkserver* that imported those libraries once (`PRELOAD`; no computation runs in it, so no
OpenMP thread pool exists when it forks). The forked command then runs the script as `python
script args` would: `__main__`, `sys.argv`, `sys.path[0]`, the working directory and the
environment are the script's, its output (stdout and stderr together) goes to the caller's pipe,
its atexit handlers run and its exit status is the script's; its stdin is empty, and `ps` shows
it with the forkserver's command line (the command itself is in the caller's log). The
arithmetic is the same code in the same libraries with the same seeds and thread count, so the
numbers are the same (tests/test_launcher.py compares them). Not so for a script whose output
depends on what was imported before it: scripts/stdlib_corpus.py reads docstrings from imported
standard-library modules, some of which the preloaded libraries patch; such a command runs fresh.

The server is started with the environment of the first command: its libraries read some variables
(OMP_NUM_THREADS, HF_HUB_OFFLINE, ...) once, when they are imported. A command with another
environment therefore runs as a plain `python` subprocess, as does every command without `preload`
or where the platform has no forkserver (`Command.forked` says which).
"""
from __future__ import annotations

import atexit
import builtins
import importlib.machinery
import io
import logging
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import types

logger = logging.getLogger(__name__)

# Imported once in the server: the libraries every training, evaluation and IIA command imports.
PRELOAD = ["torch", "transformers", "transformers.trainer", "transformers.models.bert.modeling_bert",
           "transformers.models.distilbert.modeling_distilbert", "transformers.models.llama.modeling_llama",
           "transformers.models.gpt2.modeling_gpt2", "datasets", "numpy", "safetensors.torch"]

_server_lock = threading.Lock()
_context = None
_server_env: dict[str, str] | None = None


def can_preload() -> bool:
    """Linux only: elsewhere forking a process that loaded these libraries is less well trodden (macOS's system
    frameworks); those platforms start fresh processes."""
    return sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods()


def _forkserver(env: dict[str, str]):
    """The forkserver context, its server started (once per process) with `env` as its environment; None if the
    server runs with another environment."""
    global _context, _server_env
    with _server_lock:
        if _context is False:  # could not be started
            return None
        if _context is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(PRELOAD)
            saved = dict(os.environ)
            os.environ.clear()
            os.environ.update(env)
            try:
                from multiprocessing import forkserver
                forkserver.ensure_running()
            finally:
                os.environ.clear()
                os.environ.update(saved)
            _context, _server_env = context, dict(env)
        return _context if env == _server_env else None


def _disable() -> None:
    global _context, _server_env
    with _server_lock:
        _context, _server_env = False, None


def _run_script(script: str, args: list[str], env: dict[str, str], cwd: str, out: socket.socket) -> None:
    """In the forked process: become `python script args`, its output into `out`."""
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    out.close()
    # Python's own streams for a pipe: stdout block-buffered (unbuffered with PYTHONUNBUFFERED), stderr by line
    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    sys.stdout = io.TextIOWrapper(open(1, "wb", buffering=0 if unbuffered else -1, closefd=False),
                                  encoding=sys.stdout.encoding, errors=sys.stdout.errors, write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(open(2, "wb", buffering=0, closefd=False), encoding=sys.stderr.encoding,
                                  errors="backslashreplace", line_buffering=True)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    path = os.path.abspath(script)
    sys.argv = [script, *args]
    sys.path[0] = os.path.dirname(path)
    # the script as python runs it: a fresh __main__ (absolute __file__, no __spec__), its code compiled from the file
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __cached__=None, __builtins__=builtins,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    sys.modules["__main__"] = main
    try:
        with open(path, "rb") as fh:
            code = compile(fh.read(), path, "exec")
        exec(code, main.__dict__)
    except SystemExit:
        raise
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback python prints, without multiprocessing's header
        raise SystemExit(1) from None
    finally:
        atexit._run_exitfuncs()  # a multiprocessing child leaves with os._exit; the script's atexit work runs here
        sys.stdout.flush()
        sys.stderr.flush()


def _start_without_main(child) -> None:
    """Start `child` without multiprocessing re-importing the caller's main script in it (which would run that
    script's unguarded top level, fails for `python -`, and costs time): a `__main__` with a spec named `__main__`
    is one multiprocessing leaves alone. The command then gets its own `__main__` (`_run_script`)."""
    main = sys.modules["__main__"]
    with _server_lock:
        saved = getattr(main, "__spec__", None)
        if saved is None:
            main.__spec__ = importlib.machinery.ModuleSpec("__main__", None)
        try:
            child.start()
        finally:
            if saved is None:
                main.__spec__ = None


class Command:
    """One running command: `fileno()` its merged output, `wait()` its exit status, `terminate()`."""

    def __init__(self, script: str, args: list[str], env: dict[str, str], cwd: str, preload: bool):
        self._proc = self._child = None
        self.forked = False
        if preload and can_preload():
            pair = ()
            try:
                context = _forkserver(env)
                if context is not None:
                    pair = ours, theirs = socket.socketpair()
                    self._child = context.Process(target=_run_script, args=(script, args, env, cwd, theirs),
                                                  name=os.path.basename(script))
                    _start_without_main(self._child)
                    theirs.close()
                    self._out, self.forked = ours, True
            except OSError as err:  # no Unix sockets, no processes to spare: the plain way still works
                logger.warning("could not fork %s from the preloaded server (%s); fresh processes from now on",
                               script, err)
                _disable()
                self._child = None
                for end in pair:
                    end.close()
        if not self.forked:
            self._proc = subprocess.Popen([sys.executable, script, *args], cwd=cwd, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            self._out = self._proc.stdout

    def fileno(self) -> int:
        return self._out.fileno()

    def wait(self) -> int:
        """The exit status, as subprocess reports it: negative for a signal."""
        if self._proc is not None:
            rc = self._proc.wait()
        else:
            self._child.join()
            rc = self._child.exitcode
        self._out.close()
        return rc

    def terminate(self) -> None:
        (self._proc or self._child).terminate()
