"""Issue 21, items 1-3 and 6: no code from checkpoints, a checkpoint is sealed by its manifest, --force never
loses the previous run, every message about resuming names the folder, one run at a time in a dump path."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from helpers import SUBPROCESS_ENV, assert_same_weights, free_port, student_weights, train_argv

import causal_distiller
import causal_train
import checkpoints
from run_lock import RunLock
from utils import CliError


def _argv(distill_setup, dump, *extra):
    return train_argv(distill_setup, dump, "--max_steps", "3", "--checkpoint_interval", "1", "--log_interval", "1",
                      *extra)


@pytest.fixture(scope="module")
def three_steps(distill_setup, tmp_path_factory):
    """A finished 3-step run with checkpoint-1, -2 and -3 (read-only: copy it)."""
    dump = tmp_path_factory.mktemp("trust") / "run"
    causal_train.main(_argv(distill_setup, dump))
    return dump


@pytest.fixture
def run_copy(three_steps, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(three_steps, dump)
    return dump


class _Payload:
    """What a crafted file would do: run a command when unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- 1. no code from a checkpoint ---------------------------------------------------------------------

@pytest.mark.parametrize("manifest", ["recomputed", "deleted"])
def test_a_crafted_training_state_runs_nothing(distill_setup, run_copy, tmp_path, manifest):
    marker = tmp_path / "pwned"
    folder = run_copy / "checkpoint-3"
    state = checkpoints.load_training_state(folder / "training_state.pt")
    state["payload"] = _Payload(marker)
    torch.save(state, folder / "training_state.pt")
    if manifest == "recomputed":  # an attacker recomputes the checksums...
        checkpoints.write_manifest(folder)
        with pytest.raises(CliError) as err:
            causal_train.main(_argv(distill_setup, run_copy, "--resume_from", str(folder)))
        assert "cannot read training_state.pt (refused by weights-only loading: it needs posix.system" in str(err.value)
        assert "Re-running" not in str(err.value) and "\n" not in str(err.value)  # not torch's advice to unpickle
    else:  # ... or deletes the manifest: then the checkpoint is damaged and skipped
        (folder / "manifest.json").unlink()
        with pytest.raises(CliError, match=r"--resume_from .*checkpoint-3 is damaged or incomplete: manifest.json is "
                                           r"missing"):
            causal_train.main(_argv(distill_setup, run_copy, "--resume_from", str(folder)))
        assert checkpoints.find_resume_checkpoint(run_copy).name == "checkpoint-2"
    assert not marker.exists()
    with pytest.raises(Exception, match="posix.system"):  # what torch.load(weights_only=True) refuses
        checkpoints.load_training_state(folder / "training_state.pt")
    assert not marker.exists()


@pytest.mark.parametrize("state, message", [
    ({"hello": 1}, "training_state.pt lacks optimizer, scheduler"),
    ([1, 2, 3], "training_state.pt holds a list, not a training state"),
    ("n_step", "training_state.pt: n_step is 'three', not an int >= 0"),
    ("rng", "RNG state of 0 processes"),
], ids=["wrong-keys", "a-list", "n_step-a-string", "no-rng"])
def test_a_training_state_of_the_wrong_shape_is_a_clear_error(distill_setup, run_copy, state, message):
    folder = run_copy / "checkpoint-3"
    if isinstance(state, str):  # one entry of a real state made wrong
        real = checkpoints.load_training_state(folder / "training_state.pt")
        real[state] = "three" if state == "n_step" else []
        state = real
    torch.save(state, folder / "training_state.pt")
    checkpoints.write_manifest(folder)
    with pytest.raises(CliError) as err:
        causal_train.main(_argv(distill_setup, run_copy, "--resume_from", str(folder)))
    assert f"checkpoint {folder} is damaged" in str(err.value) and message in str(err.value), str(err.value)


# --- 2. a checkpoint is sealed by its manifest -----------------------------------------------------------

def _size_a_string(m):
    m["files"]["model.safetensors"]["size"] = str(m["files"]["model.safetensors"]["size"])
    return m


def _outside(m):
    m["files"]["../../x"] = m["files"]["config.json"]
    return m


# kind -> (the new manifest from the real one: a JSON value, bytes, or None to delete it; the problem named)
MANIFESTS = {
    "deleted": (lambda m: None, "manifest.json is missing"),
    "no-files": (lambda m: {"files": {}}, "manifest.json does not list training_state.pt"),
    "files-a-list": (lambda m: {"files": []}, 'manifest.json is malformed (no "files" object'),
    "null": (lambda m: b"null", 'manifest.json is malformed (no "files" object'),
    "entry-an-int": (lambda m: {"files": {"training_state.pt": 5, "model.safetensors": 5}},
                     "the entry of training_state.pt is not"),
    "size-a-string": (_size_a_string, "the entry of model.safetensors is not"),
    "path-outside": (_outside, "manifest.json is malformed (file name '../../x')"),
    "not-json": (lambda m: b"{files", "manifest.json is unreadable"),
}


@pytest.mark.parametrize("kind", list(MANIFESTS))
def test_a_checkpoint_without_a_sound_manifest_is_damaged_and_never_loaded(distill_setup, three_steps, run_copy,
                                                                            kind, caplog):
    """Issue 21.2: the manifest deleted (or malformed) and a byte of the weights flipped: --resume used to train on
    from the corrupt weights. Now it is named, skipped, and the run redoes its step from checkpoint-2."""
    folder = run_copy / "checkpoint-3"
    make, message = MANIFESTS[kind]
    manifest = folder / "manifest.json"
    content = make(json.loads(manifest.read_text()))
    if content is None:
        manifest.unlink()
    elif isinstance(content, bytes):
        manifest.write_bytes(content)
    else:
        manifest.write_text(json.dumps(content))
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x40  # a bit of the last tensor
    weights.write_bytes(bytes(data))
    assert message in checkpoints.checkpoint_problem(folder)
    caplog.set_level("INFO")
    causal_train.main(_argv(distill_setup, run_copy, "--resume"))
    warning = next(r.getMessage() for r in caplog.records if "is damaged or incomplete" in r.getMessage())
    assert warning.startswith(f"checkpoint {folder} is damaged or incomplete: ") and message in warning, warning
    assert f"resumed from {run_copy / 'checkpoint-2'}" in caplog.text
    assert_same_weights(student_weights(run_copy), student_weights(three_steps))


# --- 3. --force never loses the previous run ----------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--temperature", "nan"), ("--alpha_ce", "nan"), ("--learning_rate", "inf"),
                                         ("--weight_decay", "inf"), ("--adam_epsilon", "inf"), ("--max_grad_norm", "nan")])
def test_force_with_a_non_finite_hyper_parameter_is_refused_before_touching_the_old_run(distill_setup, three_steps,
                                                                                        run_copy, tmp_path, flag, value):
    with pytest.raises(CliError, match=f"{flag} must be a finite number, not {value}"):
        causal_train.main(_argv(distill_setup, run_copy, "--force", flag, value))
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
        causal_train.main(_argv(distill_setup, run_copy, "--force"))
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
        causal_train.main(_argv(distill_setup, run_copy, "--force"))
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
        causal_train.main(_argv(distill_setup, run_copy, *flags))
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
    causal_train.main(_argv(distill_setup, run_copy, "--force", "--max_steps", "2"))
    assert seen == [True, False]
    assert f"{aside} still holds the run an earlier --force replaced" in caplog.text
    assert not aside.exists()


def test_every_resume_message_names_the_folder(distill_setup, run_copy, monkeypatch, caplog):
    """SIGTERM at step 2: the stop message names the checkpoint that --resume continues from; so do the refusal of
    an existing --dump_path and the resume itself."""
    with pytest.raises(CliError, match=f"already exists; add --force to overwrite or --resume to continue "
                                       f"\\(from {run_copy / 'checkpoint-3'}\\)"):
        causal_train.main(_argv(distill_setup, run_copy))
    dump = run_copy.with_name("term")
    original = causal_distiller.CausalDistiller.step

    def step(self, window):
        out = original(self, window)
        if self.n_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler takes it
        return out

    monkeypatch.setattr(causal_distiller.CausalDistiller, "step", step)
    with pytest.raises(SystemExit) as stop:
        causal_train.main(_argv(distill_setup, dump, "--checkpoint_interval", "0", "--max_steps", "5"))
    assert stop.value.code == 128 + signal.SIGTERM
    assert (f"stopped by signal 15; resume with the same command plus --resume (it continues from "
            f"{dump / 'checkpoint-2'})") in caplog.text


def test_a_stop_at_a_checkpoint_step_writes_that_checkpoint_once(distill_setup, tmp_path, monkeypatch, caplog):
    """Issue 21.8: SIGINT logged "checkpoint written" twice: the stop rewrote the checkpoint its step had just written."""
    original = causal_distiller.CausalDistiller.step

    def step(self, window):
        out = original(self, window)
        if self.n_step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(causal_distiller.CausalDistiller, "step", step)
    caplog.set_level("INFO")
    dump = tmp_path / "int"
    with pytest.raises(SystemExit) as stop:
        causal_train.main(_argv(distill_setup, dump, "--max_steps", "5"))
    assert stop.value.code == 128 + signal.SIGINT
    written = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint written")]
    assert written == [f"checkpoint written: {dump / 'checkpoint-1'}", f"checkpoint written: {dump / 'checkpoint-2'}"]


# --- 6. one run at a time in a dump path ----------------------------------------------------------------

def test_a_second_run_on_the_same_dump_path_is_refused_and_names_the_holder(distill_setup, run_copy, tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from run_lock import RunLock; "
                               "RunLock(sys.argv[1], '--dump_path').acquire(); print('locked', flush=True); time.sleep(600)",
         str(run_copy)], stdout=subprocess.PIPE, text=True, env=SUBPROCESS_ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CliError) as err:
            causal_train.main(_argv(distill_setup, run_copy, "--resume", "--max_steps", "4"))
        assert f"--dump_path {run_copy} is in use by another run (pid {holder.pid} on " in str(err.value)
        assert "from run_lock import RunLock" in str(err.value)  # its command line
        assert [p.name for p in checkpoints.list_checkpoints(run_copy)][-1] == "checkpoint-3"  # untouched
    finally:
        holder.kill()
        holder.wait()
    causal_train.main(_argv(distill_setup, run_copy, "--resume", "--max_steps", "4"))  # released with its holder
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
        causal_train.main(_argv(distill_setup, ".", "--force"))
    assert (tmp_path / "precious.txt").read_text() == "the user's files"


# --- 6. DataLoader workers and torchrun -------------------------------------------------------------------

def _start(argv, **kwargs):
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _read_until(proc, needle, log, seconds=300):
    import time

    deadline = time.time() + seconds
    for line in proc.stdout:
        log.append(line)
        if needle in line or time.time() > deadline:
            return


@pytest.mark.e2e
@pytest.mark.parametrize("with_sigterm", [True, False], ids=["worker-killed-with-sigterm", "worker-killed-alone"])
def test_a_killed_dataloader_worker_never_costs_the_run(distill_setup, tmp_path, one_thread, with_sigterm):
    """Issue 21.6: a worker killed together with a SIGTERM gave a traceback (torch raises a dead worker's error from a
    SIGCHLD handler, in the middle of the step) and no stop checkpoint. Now the stop checkpoint is written, or, for a
    worker killed alone, the run goes on collating in-process; either way the result is bitwise the uninterrupted one."""
    import psutil

    argv = _argv(distill_setup, tmp_path / "cut", "--num_workers", "1", "--checkpoint_interval", "0", "--max_steps", "6",
                 "--gradient_accumulation_steps", "3")
    proc = _start(["causal_train.py", *argv])
    log = []
    _read_until(proc, "step 2 |", log)
    workers = psutil.Process(proc.pid).children()
    assert workers, "no DataLoader worker"
    for w in workers:
        w.kill()
    if with_sigterm:
        proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(log) + rest
    assert "Traceback" not in log, log[-3000:]
    if with_sigterm:
        assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
        assert checkpoints.list_checkpoints(tmp_path / "cut"), log[-3000:]
        causal_train.main(argv + ["--resume"])
    else:
        assert proc.returncode == 0, log[-3000:]
        assert "a DataLoader worker died (" in log and "collating the rest of the epoch in this process" in log
    full = tmp_path / "full"
    causal_train.main(_argv(distill_setup, full, "--num_workers", "1", "--checkpoint_interval", "0", "--max_steps", "6",
                            "--gradient_accumulation_steps", "3"))
    assert_same_weights(student_weights(tmp_path / "cut"), student_weights(full))


def test_a_rank_that_saw_no_signal_stops_with_the_other_ranks_signal(monkeypatch):
    """A killed torchrun reaches its orphaned ranks at different moments: rank 0 may see its launcher gone (SIGHUP)
    while rank 1 has not yet. Both stop at that step, and rank 1 with SIGHUP too: it raised Preempted(None) and died
    on 128 + None (seen once in CI) before the ranks agreed on the signal, not only on stopping."""
    import stop_signals

    def all_reduce(tensor, op):  # what the other rank (which saw SIGHUP) contributes
        assert op == torch.distributed.ReduceOp.MAX
        tensor.copy_(torch.maximum(tensor, torch.tensor([float(signal.SIGHUP)])))

    cpu = torch.device("cpu")
    monkeypatch.setattr(stop_signals.dist, "all_reduce", all_reduce)
    rank1 = stop_signals.StopSignals()  # (not installed: its launcher is unknown, so never "gone")
    assert rank1.agreed(True, cpu)
    assert rank1.signum == signal.SIGHUP and 128 + rank1.signum == 129

    # a rank that received SIGTERM itself keeps it; with no signal anywhere nobody stops
    rank0 = stop_signals.StopSignals()
    rank0.signum = signal.SIGTERM
    assert rank0.agreed(True, cpu) and rank0.signum == signal.SIGTERM
    monkeypatch.setattr(stop_signals.dist, "all_reduce", lambda tensor, op: None)
    idle = stop_signals.StopSignals()
    assert not idle.agreed(True, cpu) and idle.signum is None


@pytest.mark.e2e
def test_ranks_orphaned_by_a_killed_torchrun_stop_with_a_checkpoint(distill_setup, tmp_path):
    """Issue 21.6: kill -9 of torchrun left both ranks training as orphans. Each rank now notices its launcher is gone,
    and all stop at the same step with a sound checkpoint (exit 129, as for SIGHUP)."""
    import psutil

    dump = tmp_path / "ddp"
    argv = _argv(distill_setup, dump, "--checkpoint_interval", "0", "--max_steps", "200", "--n_epoch", "20",
                 "--log_interval", "1")  # far longer than the test waits: only a stop ends it
    torchrun = _start(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                       "causal_train.py", *argv])
    log = []
    _read_until(torchrun, "step 2 |", log)
    ranks = [p for p in psutil.Process(torchrun.pid).children(recursive=True) if "causal_train.py" in " ".join(p.cmdline())]
    assert len(ranks) == 2, log[-50:]
    torchrun.kill()  # kill -9: the ranks are orphans now
    torchrun.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=240)
    for p in alive:
        p.kill()
    rest = torchrun.stdout.read()  # the ranks wrote into the pipe torchrun handed them
    log = "".join(log) + rest
    assert not alive, log[-4000:]
    assert log.count("stopped by signal 1; resume with the same command plus --resume") == 2, log[-4000:]
    assert "the launcher that started this rank (torchrun, pid" in log
    found = checkpoints.list_checkpoints(dump)
    assert found and checkpoints.checkpoint_problem(found[-1]) is None, log[-4000:]
    assert int(found[-1].name.split("-")[1]) < 200


@pytest.mark.e2e
def test_kill9_of_a_force_run_before_its_first_checkpoint_keeps_the_previous_run(distill_setup, three_steps, run_copy):
    """Issue 21.3, for real: kill -9 of a --force run between moving the old run aside and its first checkpoint.
    --resume names the hidden folder holding the old run, and the old run is intact there."""
    argv = _argv(distill_setup, run_copy, "--force", "--checkpoint_interval", "0", "--max_steps", "30")
    proc = _start(["causal_train.py", *argv])
    log = []
    _read_until(proc, "step 1 |", log)
    proc.kill()
    proc.wait()
    aside = run_copy.with_name(".run.replaced")
    assert aside.is_dir() and not checkpoints.list_checkpoints(run_copy), "".join(log)[-2000:]
    with pytest.raises(CliError, match=f"The run that an earlier --force replaced is kept in {aside}"):
        causal_train.main(_argv(distill_setup, run_copy, "--resume"))
    assert [p.name for p in checkpoints.list_checkpoints(aside)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert_same_weights(student_weights(aside), student_weights(three_steps))
