"""scripts/launcher.py: a command forked from the preloaded server behaves as `python script args` would."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import ROOT

from pipelines import launcher
from helpers import student_weights, train_argv

pytestmark = pytest.mark.skipif(not launcher.can_preload(), reason="no forkserver on this platform")

# Every command here has this environment, so that they share the server (started by the first one).
ENV = {"PATH": os.environ["PATH"], "PROBE_MARKER": "m1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

PROBE = textwrap.dedent("""
    import atexit, json, os, sys
    atexit.register(lambda: open("atexit.txt", "w").write("ran"))
    print(json.dumps({"name": __name__, "argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0],
                      "file": __file__, "marker": os.environ.get("PROBE_MARKER"),
                      "leaked": os.environ.get("PROBE_NOT_PASSED")}))
    print("to stderr", file=sys.stderr)
    code = sys.argv[1]
    if code == "raise":
        raise ValueError("the probe failed")
    if code == "text":
        sys.exit("a message for the user")
    sys.exit(int(code))
""")


def run(script, args, cwd, preload=True, env=ENV) -> tuple[int, str]:
    command = launcher.Command(str(script), [str(a) for a in args], env, str(cwd), preload)
    assert command.forked == (preload and env == ENV)
    chunks = []
    while chunk := os.read(command.fileno(), 65536):
        chunks.append(chunk)
    return command.wait(), b"".join(chunks).decode()


@pytest.fixture
def probe(tmp_path, monkeypatch):
    script = tmp_path / "scripts" / "probe.py"
    script.parent.mkdir()
    script.write_text(PROBE)
    monkeypatch.setenv("PROBE_NOT_PASSED", "yes")  # in the caller's environment, not in the command's
    return script, tmp_path


@pytest.mark.parametrize("preload", [True, False], ids=["forked", "fresh"])
def test_a_forked_command_is_the_script_run_by_python(probe, preload):
    script, cwd = probe
    rc, out = run("scripts/probe.py", ["0", "--flag"], cwd, preload)
    assert rc == 0, out
    seen = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    assert seen == {"name": "__main__", "argv": ["scripts/probe.py", "0", "--flag"], "cwd": str(cwd),
                    "path0": str(script.parent), "file": str(script), "marker": "m1", "leaked": None}
    assert "to stderr" in out  # stdout and stderr both reach the caller
    assert out.index("to stderr") < out.index("{")  # stdout to a pipe is block-buffered, as in a fresh python
    assert (cwd / "atexit.txt").read_text() == "ran"  # the script's atexit handlers run


@pytest.mark.parametrize("preload", [True, False], ids=["forked", "fresh"])
@pytest.mark.parametrize("how, status, shown", [("3", 3, ""), ("text", 1, "a message for the user"),
                                                ("raise", 1, "ValueError: the probe failed")])
def test_exit_status_and_error_text_are_the_scripts(probe, preload, how, status, shown):
    _, cwd = probe
    rc, out = run("scripts/probe.py", [how], cwd, preload)
    assert rc == status and shown in out
    assert "Process " not in out  # no multiprocessing header on the traceback


def test_a_command_with_another_environment_runs_fresh(probe):
    script, cwd = probe
    rc, out = run("scripts/probe.py", ["0"], cwd, True, env={**ENV, "PROBE_MARKER": "m2"})
    assert rc == 0 and '"marker": "m2"' in out


def test_terminate_stops_a_forked_command(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(120)\n")
    command = launcher.Command(str(script), [], ENV, str(tmp_path), True)
    assert command.forked and os.read(command.fileno(), 100).startswith(b"started")
    start = time.time()
    command.terminate()
    assert command.wait() == -signal.SIGTERM and time.time() - start < 30


def test_a_training_command_forked_or_fresh_writes_the_same_student(distill_setup, tmp_path):
    """The point of the launcher: the same command gives the same bytes whichever way it starts."""
    students = {}
    for preload in (True, False):
        dump = tmp_path / f"student_{preload}"
        rc, out = run(ROOT / "causal_train.py", train_argv(distill_setup, dump, "--max_steps", "3"), ROOT, preload)
        assert rc == 0, out[-3000:]
        students[preload] = student_weights(dump)
    assert students[True].keys() == students[False].keys()
    assert all(students[True][k].equal(students[False][k]) for k in students[True])


def test_a_server_that_cannot_start_falls_back_to_fresh_processes(probe, monkeypatch, caplog):
    def refuse(env):
        raise OSError("no sockets here")

    monkeypatch.setattr(launcher, "_forkserver", refuse)
    monkeypatch.setattr(launcher, "_context", None)
    _, cwd = probe
    command = launcher.Command("scripts/probe.py", ["4"], ENV, str(cwd), True)
    while os.read(command.fileno(), 65536):
        pass
    assert not command.forked and command.wait() == 4
    assert "no sockets here" in caplog.text and launcher._context is False  # later commands do not retry


@pytest.mark.parametrize("how", ["unguarded script", "stdin"])
def test_a_caller_without_a_main_guard_can_fork_commands(tmp_path, how):
    """multiprocessing would re-import the caller's main script in the child; the launcher keeps it out."""
    (tmp_path / "hello.py").write_text("print('hello from the command')\n")
    caller = textwrap.dedent(f"""
        import os, sys
        from pipelines import launcher
        c = launcher.Command("hello.py", [], {{"PATH": os.environ["PATH"]}}, {str(tmp_path)!r}, True)
        out = b""
        while chunk := os.read(c.fileno(), 65536):
            out += chunk
        print(c.forked, c.wait(), out.decode().strip())
    """)
    if how == "stdin":
        proc = subprocess.run([sys.executable, "-"], input=caller, capture_output=True, text=True, timeout=300)
    else:
        (tmp_path / "caller.py").write_text(caller)
        proc = subprocess.run([sys.executable, str(tmp_path / "caller.py")], capture_output=True, text=True,
                              timeout=300)
    assert proc.stdout.strip() == "True 0 hello from the command", proc.stdout + proc.stderr
