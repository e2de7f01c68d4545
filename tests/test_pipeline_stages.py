"""pipelines/stages.py and the pipelines' output folders: a pipeline (quickstart, reproduce) writes only into a
folder of its own, deletes only stage folders it made and what their stages wrote, never an input, and runs
alone in its --out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT
from helpers import SUBPROCESS_ENV

import quickstart
import reproduce
from pipelines.quickstart.pipeline import QUICKSTART_ENV, Pipeline, started
from pipelines.stages import check_inputs_outside, check_out
from utils import CliError


def prose(n: int) -> str:
    return "\n".join(f"Paragraph {i} tells how the quick brown fox jumped over the lazy dog {i} times." for i in range(n))


def run_quickstart(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "quickstart.py"), *args], cwd=ROOT,
                          env={**SUBPROCESS_ENV, **QUICKSTART_ENV}, capture_output=True, text=True, timeout=300)


# --- the quickstart's --out ------------------------------------------------------------------------------------

def test_text_inside_out_is_refused_and_kept(tmp_path):
    out = tmp_path / "out"
    text = out / "corpus" / "my_text.txt"
    text.parent.mkdir(parents=True)
    text.write_text(prose(40))
    proc = run_quickstart("--preset", "test", "--text", str(text), "--out", str(out))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--text {text} lies inside --out {out}" in proc.stderr and "Traceback" not in proc.stderr
    assert text.read_text() == prose(40)
    assert sorted(p.name for p in out.iterdir()) == ["corpus"]  # nothing written either


@pytest.mark.parametrize("user_file", ["teacher/notes.txt", "data/mydata.txt", "report.md"])
def test_an_out_holding_the_users_files_is_refused_untouched(tmp_path, user_file):
    out = tmp_path / "out"
    mine = out / user_file
    mine.parent.mkdir(parents=True)
    mine.write_text("my own notes\n")
    with pytest.raises(CliError, match=rf"--out {out} is not empty and holds no quickstart.json: it is not a folder of "
                                       rf"scripts/quickstart.py"):
        quickstart.main(["--preset", "test", "--out", str(out)])
    assert mine.read_text() == "my own notes\n"
    assert [p for p in out.rglob("*") if p.is_file()] == [mine]


def test_an_out_of_an_older_quickstart_is_adopted(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "commands.sh").write_text("# quickstart 2026-11-30T10:00:00: python scripts/quickstart.py\n")
    assert check_out(out, quickstart.MANIFEST, quickstart.MANIFEST_TOOL, "scripts/quickstart.py",
                     legacy=quickstart.made_by_an_older_quickstart) is None
    quickstart.claim_out(out)
    assert json.loads((out / "quickstart.json").read_text())["tool"] == quickstart.MANIFEST_TOOL
    assert check_out(out, quickstart.MANIFEST, quickstart.MANIFEST_TOOL, "scripts/quickstart.py")["version"] == 1


def test_a_manifest_of_another_tool_is_refused(tmp_path):
    (tmp_path / "quickstart.json").write_text(json.dumps({"tool": "something else"}))
    with pytest.raises(CliError, match="was not written by scripts/quickstart.py"):
        quickstart.claim_out(tmp_path)


def test_one_quickstart_per_out_at_a_time(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pipelines.stages import lock_out; lock_out(__import__('pathlib')"
                               ".Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CliError, match=rf"--out {out} is in use by another run \(pid {holder.pid} on "):
            quickstart.main(["--preset", "test", "--out", str(out)])
        with pytest.raises(CliError, match=rf"--out {out} is in use by another run"):
            reproduce.main(["--preset", "tiny", "--rows", "distilbert-6L-0.1B", "--seeds", "1", "--out", str(out),
                            "--only", "tables"])
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


# --- a stage's folder ------------------------------------------------------------------------------------------

def run_unit(pipe: Pipeline, folder, files: dict[str, str], key: str = "a") -> dict:
    def work(f):
        for name, text in files.items():
            (f / name).write_text(text)
        return {"wrote": sorted(files)}

    return pipe.unit("stage", folder, {"key": key}, work)


def test_a_stage_replaces_only_its_own_folder_and_files(tmp_path):
    pipe = Pipeline(tmp_path / "out", force=False, env=dict(os.environ), preload=False)
    folder = tmp_path / "out" / "stage"
    marker = run_unit(pipe, folder, {"model.bin": "1"})
    assert marker["files"] == ["model.bin"] and not started(folder).exists()
    run_unit(pipe, folder, {"model.bin": "2", "extra.bin": "2"}, key="b")  # new settings: redone in place
    assert (folder / "model.bin").read_text() == "2"
    (folder / "notes.txt").write_text("mine")  # the user's, added to a finished stage's folder
    with pytest.raises(CliError, match=f"{folder} holds notes.txt, which its stage did not write"):
        run_unit(pipe, folder, {"model.bin": "3"}, key="c")
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "model.bin").read_text() == "2"


def test_a_folder_the_pipeline_did_not_make_is_refused(tmp_path):
    pipe = Pipeline(tmp_path / "out", force=True, env=dict(os.environ), preload=False)
    folder = tmp_path / "out" / "data"
    folder.mkdir(parents=True)
    (folder / "mydata.txt").write_text("mine")
    with pytest.raises(CliError, match=f"{folder} was not made by the quickstart \\(it holds mydata.txt\\)"):
        run_unit(pipe, folder, {"x": "1"})
    assert (folder / "mydata.txt").read_text() == "mine"
    (folder / "mydata.txt").unlink()
    run_unit(pipe, folder, {"x": "1"})  # an empty folder is fine
    assert (folder / "x").read_text() == "1"


def test_an_interrupted_stage_is_redone_whole(tmp_path):
    pipe = Pipeline(tmp_path / "out", force=False, env=dict(os.environ), preload=False)
    folder = tmp_path / "out" / "stage"

    def dies(f):
        (f / "half.bin").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pipe.unit("stage", folder, {"key": "a"}, dies)
    assert started(folder).exists() and not (folder / ".done").exists()
    run_unit(pipe, folder, {"model.bin": "1"})
    assert sorted(p.name for p in folder.iterdir()) == [".done", "model.bin"]


def test_an_input_inside_a_stage_folder_is_never_removed(tmp_path):
    folder = tmp_path / "out" / "corpus"
    mine = folder / "my_text.txt"
    pipe = Pipeline(tmp_path / "out", force=True, env=dict(os.environ), preload=False, inputs=(mine,))
    run_unit(pipe, folder, {"train.txt": "t"})
    mine.write_text("mine")
    with pytest.raises(CliError, match=f"{mine} is an input of this quickstart and lies in {folder}"):
        run_unit(pipe, folder, {"train.txt": "t"})
    assert mine.read_text() == "mine"


def test_inputs_inside_out_are_found_through_links_and_dots(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(out)
    with pytest.raises(CliError, match="--tokenizer"):
        check_inputs_outside(out, [("--text", str(tmp_path / "elsewhere.txt")), ("--tokenizer", str(link / "sub"))])
    with pytest.raises(CliError, match="--text"):
        check_inputs_outside(out, [("--text", str(out / "sub" / ".." / "t.txt"))])
    check_inputs_outside(out, [("--text", str(tmp_path / "out2" / "t.txt"))])  # a sibling with a common prefix


class FakeCommand:
    """A command that prints one line and exits with a scripted status; forked unless run fresh."""

    statuses: list[int] = []
    calls: list[bool] = []

    def __init__(self, script, args, env, cwd, preload):
        self.forked = preload
        FakeCommand.calls.append(preload)
        self._status = FakeCommand.statuses.pop(0)
        self._r, w = os.pipe()
        os.write(w, f"ran {script} forked={preload}\n".encode())
        os.close(w)

    def fileno(self):
        return self._r

    def wait(self):
        os.close(self._r)
        return self._status

    def terminate(self):
        pass


@pytest.mark.parametrize("statuses, forked_first, expect_calls, ok", [
    ([255, 0], True, [True, False], True),   # status lost by the forkserver: rerun fresh, once
    ([255, 255], True, [True, False], False),  # still 255 when fresh: a real failure
    ([255], False, [False], False),          # a fresh python's 255 is the script's own
    ([2], True, [True], False),              # any other failure is not retried
])
def test_a_forked_command_whose_status_was_lost_runs_again_fresh(tmp_path, monkeypatch, statuses, forked_first,
                                                                 expect_calls, ok):
    from pipelines.quickstart import pipeline as qp

    monkeypatch.setattr(qp, "Command", FakeCommand)
    FakeCommand.statuses, FakeCommand.calls = list(statuses), []
    pipe = Pipeline(tmp_path / "out", force=False, env=dict(os.environ), preload=forked_first)
    if ok:
        pipe.command("x", "run_mlm.py", ["--a"])
        log = (tmp_path / "out" / "logs" / "x.log").read_text()
        assert "lost this command's exit status" in log and log.count("ran run_mlm.py") == 2
    else:
        with pytest.raises(qp.StageFailed, match=f"exited with status {statuses[-1]}"):
            pipe.command("x", "run_mlm.py", ["--a"])
    assert FakeCommand.calls == expect_calls
