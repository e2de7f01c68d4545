"""run_folder.py: --dump_path through a run. --force never loses the previous run (checked inputs first, moved aside,
restored on a failed start, removed after the first checkpoint) and replaces only a run's folder; every message
about resuming names the folder; one run at a time."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys

import pytest
from helpers import (
    SUBPROCESS_ENV,
    assert_same_weights,
    checkpointed_argv,
    read_until,
    start_process,
    student_weights,
)

import causal_distiller
import causal_train
import checkpoints
from run_lock import RunLock
from utils import CliError


@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--alpha_ce", "nan"), ("--learning_rate", "inf"),
                                         ("--weight_decay", "inf"), ("--adam_epsilon", "inf"), ("--max_grad_norm", "nan")])
def test_force_with_a_non_finite_hyper_parameter_is_refused_before_touching_the_old_run(distill_setup, three_steps,
                                                                                        run_copy, tmp_path, flag, value):
    with pytest.raises(CliError, match=f"{flag} must be a finite number, not {value}"):
        causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--force", flag, value))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert_same_weights(student_weights(run_copy), student_weights(three_steps))


def _nan_from_the_first_step(monkeypatch):
    original = causal_distiller.compute_losses

    def poisoned(*args, **kwargs):
        values, total = original(*args, **kwargs)
        return {k: v * float("nan") for k, v in values.items()}, total * float("nan")

    monkeypatch.setattr(causal_distiller, "compute_losses", poisoned)


def test_force_run_failing_at_its_first_step_restores_the_previous_run(distill_setup, three_steps, run_copy, tmp_path,
                                                                       monkeypatch, caplog):
    """Values that pass every check and still fail at the first step (a non-finite loss): the old run comes back,
    and no checkpoint-0 (the untrained start) is written in its place."""
    _nan_from_the_first_step(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--force"))
    assert stop.value.code == 3
    assert "the previous contents of %s are restored" % run_copy in caplog.text
    assert "no step was trained, so no checkpoint is written" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert [p.name for p in checkpoints.list_checkpoints(run_copy)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert_same_weights(student_weights(run_copy), student_weights(three_steps))


def test_force_run_with_a_full_disk_at_its_first_checkpoint_restores_and_says_there_is_nothing_to_resume(
        distill_setup, three_steps, run_copy, tmp_path, monkeypatch, caplog):
    import safetensors
    import transformers.modeling_utils as mu

    def full_disk(*a, **k):
        raise safetensors.SafetensorError("Error while serializing: No space left on device (os error 28)")

    monkeypatch.setattr(mu, "safe_save_file", full_disk)
    with pytest.raises(CliError) as err:
        causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--force"))
    assert str(err.value) == (f"no space left on device at {run_copy / 'checkpoint-1'}; no checkpoint was written "
                              f"before; free space and run the command again (there is nothing to resume)")
    assert "the previous contents of %s are restored" % run_copy in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert_same_weights(student_weights(run_copy), student_weights(three_steps))


def _killed_force_run(run_copy):
    """What `kill -9` of a --force run leaves before its first checkpoint: the old run hidden beside the new folder."""
    aside = run_copy.with_name(".run.replaced")
    os.replace(run_copy, aside)
    run_copy.mkdir()
    for name in ("parameters.json", "git_log.json", "config.json"):
        shutil.copy(aside / name, run_copy / name)
    return aside


@pytest.mark.parametrize("flags", [("--resume",), ()], ids=["resume", "no-flag"])
def test_a_force_run_killed_before_its_first_checkpoint_names_the_hidden_previous_run(distill_setup, run_copy, flags):
    aside = _killed_force_run(run_copy)
    with pytest.raises(CliError) as err:
        causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, *flags))
    assert f"The run that an earlier --force replaced is kept in {aside}" in str(err.value), str(err.value)
    assert f"move {aside} back to {run_copy}" in str(err.value)
    assert aside.is_dir() and checkpoints.list_checkpoints(aside)


def test_force_again_after_a_kill_keeps_the_older_run_until_the_first_checkpoint(distill_setup, three_steps, run_copy,
                                                                                  monkeypatch, caplog):
    aside = _killed_force_run(run_copy)
    seen = []
    original = checkpoints.CheckpointWriter._write

    def spy(self, target, student, state):
        seen.append(aside.is_dir() and len(checkpoints.list_checkpoints(aside)) == 3)
        return original(self, target, student, state)

    monkeypatch.setattr(checkpoints.CheckpointWriter, "_write", spy)
    causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--force", "--max_steps", "2"))
    assert seen == [True, False]
    assert f"{aside} still holds the run an earlier --force replaced" in caplog.text
    assert not aside.exists()


def test_every_resume_message_names_the_folder(distill_setup, run_copy, monkeypatch, caplog):
    """SIGTERM at step 2: the stop message names the checkpoint that --resume continues from; so do the refusal of
    an existing --dump_path and the resume itself."""
    with pytest.raises(CliError, match=f"already exists; add --force to overwrite or --resume to continue "
                                       f"\\(from {run_copy / 'checkpoint-3'}\\)"):
        causal_train.main(checkpointed_argv(distill_setup, run_copy, 3))
    dump = run_copy.with_name("term")
    original = causal_distiller.CausalDistiller.step

    def step(self, window):
        out = original(self, window)
        if self.n_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler takes it
        return out

    monkeypatch.setattr(causal_distiller.CausalDistiller, "step", step)
    with pytest.raises(SystemExit) as stop:
        causal_train.main(checkpointed_argv(distill_setup, dump, 3, "--checkpoint_interval", "0", "--max_steps", "5"))
    assert stop.value.code == 128 + signal.SIGTERM
    assert (f"stopped by signal 15; resume with the same command plus --resume (it continues from "
            f"{dump / 'checkpoint-2'})") in caplog.text


def test_a_second_run_on_the_same_dump_path_is_refused_and_names_the_holder(distill_setup, run_copy, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from run_lock import RunLock; "
                               "RunLock(sys.argv[1], '--dump_path').acquire(); print('locked', flush=True); time.sleep(600)",
         str(run_copy)], stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CliError) as err:
            causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--resume", "--max_steps", "4"))
        assert f"--dump_path {run_copy} is in use by another run (pid {holder.pid} on " in str(err.value)
        assert "from run_lock import RunLock" in str(err.value)  # its command line
        assert [p.name for p in checkpoints.list_checkpoints(run_copy)][-1] == "checkpoint-3"  # untouched
    finally:
        holder.kill()
        holder.wait()
    causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--resume", "--max_steps", "4"))  # released with its holder
    assert [p.name for p in checkpoints.list_checkpoints(run_copy)][-1] == "checkpoint-4"
    assert not run_copy.with_name(".run.lock").exists()


def test_the_lock_is_taken_again_after_its_holder_released_it(tmp_path):
    first = RunLock(tmp_path / "run", "--dump_path").acquire()
    with pytest.raises(CliError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path / "run", "--dump_path").acquire()
    first.release()
    second = RunLock(tmp_path / "run", "--dump_path").acquire()
    second.release()
    assert not list(tmp_path.iterdir())


def test_dump_path_dot_with_force_is_refused(distill_setup, tmp_path, monkeypatch):
    (tmp_path / "precious.txt").write_text("the user's files")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CliError, match="--dump_path . with --force: .* is the current folder or holds it"):
        causal_train.main(checkpointed_argv(distill_setup, ".", 3, "--force"))
    assert (tmp_path / "precious.txt").read_text() == "the user's files"


@pytest.mark.e2e
def test_kill9_of_a_force_run_before_its_first_checkpoint_keeps_the_previous_run(distill_setup, three_steps, run_copy):
    """Issue 21.3, for real: kill -9 of a --force run between moving the old run aside and its first checkpoint.
    --resume names the hidden folder holding the old run, and the old run is intact there."""
    argv = checkpointed_argv(distill_setup, run_copy, 3, "--force", "--checkpoint_interval", "0", "--max_steps", "30")
    proc = start_process(["causal_train.py", *argv])
    log = []
    read_until(proc, "step 1 |", log)
    proc.kill()
    proc.wait()
    aside = run_copy.with_name(".run.replaced")
    assert aside.is_dir() and not checkpoints.list_checkpoints(run_copy), "".join(log)[-2000:]
    with pytest.raises(CliError, match=f"The run that an earlier --force replaced is kept in {aside}"):
        causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--resume"))
    assert [p.name for p in checkpoints.list_checkpoints(aside)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert_same_weights(student_weights(aside), student_weights(three_steps))


def _previous_run(folder):
    """A previous run's folder: its record of arguments (every run writes one first) and its student."""
    folder.mkdir()
    (folder / "parameters.json").write_text(json.dumps({"dump_path": str(folder), "teacher_name": "bert-base-uncased",
                                                        "student_type": "distilbert"}))
    (folder / "model.safetensors").write_bytes(b"weights of a week-long run")
    return folder


def test_force_refuses_a_folder_no_run_wrote(distill_setup, tmp_path):
    """--force replaces a run's folder; a user's folder (here with a parameters.json of another tool) is refused
    before anything is moved, and stays as it was."""
    dump = tmp_path / "mine"
    dump.mkdir()
    (dump / "notes.txt").write_text("my notes")
    (dump / "parameters.json").write_text(json.dumps({"epochs": 3}))
    with pytest.raises(CliError, match=f"--dump_path {dump} holds files no run of causal_train.py wrote "
                                       f"\\(notes.txt, parameters.json\\): --force replaces only a run's folder"):
        causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--force", "--max_steps", "2"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    assert (dump / "notes.txt").read_text() == "my notes" and sorted(p.name for p in dump.iterdir()) == [
        "notes.txt", "parameters.json"]


def test_force_through_a_link_replaces_the_folder_it_names(distill_setup, tmp_path, caplog):
    """A --dump_path that is a link is followed: the previous run is moved aside beside the folder the link names
    and removed once the new run has a checkpoint; the link stays a link to the new run."""
    target = _previous_run(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(target)
    caplog.set_level(logging.INFO)
    causal_train.main(checkpointed_argv(distill_setup, link, 4, "--force", "--max_steps", "2"))
    assert f"--dump_path {link} is a link to {target}: the run writes there" in caplog.text
    assert f"--force: removed the previous contents ({tmp_path / '.real.replaced'})" in caplog.text
    assert link.is_symlink() and link.resolve() == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert student_weights(target) and json.loads((target / "parameters.json").read_text())["max_steps"] == 2


def test_force_checks_every_input_before_touching_the_previous_run(distill_setup, tmp_path):
    dump = _previous_run(tmp_path / "run")
    with pytest.raises(CliError, match="--data_file"):
        causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--force", "--data_file", str(tmp_path / "typo.bin")))
    assert (dump / "model.safetensors").read_bytes() == b"weights of a week-long run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_force_restores_the_previous_run_when_failing_before_the_first_checkpoint(distill_setup, tmp_path, monkeypatch):
    dump = _previous_run(tmp_path / "run")

    def crash(self):
        assert not (dump / "model.safetensors").exists(), "moved aside while the new run works"
        raise CliError("out of memory at step 1")

    monkeypatch.setattr(causal_distiller.CausalDistiller, "train", crash)
    with pytest.raises(CliError):
        causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--force"))
    assert (dump / "model.safetensors").read_bytes() == b"weights of a week-long run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_force_deletes_the_previous_run_once_the_first_checkpoint_exists(distill_setup, tmp_path, monkeypatch):
    dump = _previous_run(tmp_path / "run")
    seen = []
    original = checkpoints.CheckpointWriter._write

    def spy(self, target, student, state):
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return original(self, target, student, state)

    monkeypatch.setattr(checkpoints.CheckpointWriter, "_write", spy)
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--force", "--max_steps", "2"))
    assert seen[0] == [".run.lock", ".run.replaced", "run"] and seen[1] == [".run.lock", "run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert student_weights(dump)  # the new student replaced the old file


def test_a_failed_run_leaves_no_folder_behind(distill_setup, tmp_path):
    with pytest.raises(CliError):
        causal_train.main(checkpointed_argv(distill_setup, tmp_path / "new" / "run", 4, "--token_counts", str(tmp_path / "none.pickle")))
    assert not (tmp_path / "new" / "run").exists()
