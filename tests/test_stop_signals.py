"""stop_signals.py and the stops of a run: SIGTERM, Ctrl-C, a killed DataLoader worker or torchrun end the run at a
step with a checkpoint, every rank at the same step, and it resumes exactly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT
from helpers import (
    SUBPROCESS_ENV,
    assert_same_weights,
    checkpointed_argv,
    free_port,
    read_until,
    start_process,
    student_weights,
    two_epoch_argv,
)

import causal_distiller
import causal_train
import checkpoints
import lm_seqs_dataset


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
        causal_train.main(checkpointed_argv(distill_setup, dump, 3, "--max_steps", "5"))
    assert stop.value.code == 128 + signal.SIGINT
    written = [r.getMessage() for r in caplog.records if r.getMessage().startswith("checkpoint written")]
    assert written == [f"checkpoint written: {dump / 'checkpoint-1'}", f"checkpoint written: {dump / 'checkpoint-2'}"]


@pytest.mark.e2e
@pytest.mark.parametrize("with_sigterm", [True, False], ids=["worker-killed-with-sigterm", "worker-killed-alone"])
def test_a_killed_dataloader_worker_never_costs_the_run(distill_setup, tmp_path, one_thread, with_sigterm):
    """Issue 21.6: a worker killed together with a SIGTERM gave a traceback (torch raises a dead worker's error from a
    SIGCHLD handler, in the middle of the step) and no stop checkpoint. Now the stop checkpoint is written, or, for a
    worker killed alone, the run goes on collating in-process; either way the result is bitwise the uninterrupted one."""
    import psutil

    argv = checkpointed_argv(distill_setup, tmp_path / "cut", 3, "--num_workers", "1", "--checkpoint_interval", "0", "--max_steps", "6",
                 "--gradient_accumulation_steps", "3")
    proc = start_process(["causal_train.py", *argv])
    log = []
    read_until(proc, "step 2 |", log)
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
    causal_train.main(checkpointed_argv(distill_setup, full, 3, "--num_workers", "1", "--checkpoint_interval", "0", "--max_steps", "6",
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
    argv = checkpointed_argv(distill_setup, dump, 3, "--checkpoint_interval", "0", "--max_steps", "200", "--n_epoch", "20",
                 "--log_interval", "1")  # far longer than the test waits: only a stop ends it
    torchrun = start_process(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
                       "causal_train.py", *argv])
    log = []
    read_until(torchrun, "step 2 |", log)
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
def test_sigterm_to_the_process_group_with_a_worker_checkpoints_and_resumes_exactly(distill_setup, tmp_path, one_thread):
    """What Slurm, Kubernetes and docker stop do: SIGTERM to every process of the group, DataLoader worker included."""
    argv = checkpointed_argv(distill_setup, tmp_path / "cut", 4, "--num_workers", "1", "--checkpoint_interval", "0", "--max_steps", "8")
    proc = subprocess.Popen([sys.executable, "causal_train.py", *argv], cwd=ROOT, env=SUBPROCESS_ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = [], time.time() + 300
    for line in proc.stdout:
        log.append(line)
        if "step 2 |" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(log) + rest
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "DataLoader worker" not in log and "Traceback" not in log, log[-3000:]
    ckpts = checkpoints.list_checkpoints(tmp_path / "cut")
    assert len(ckpts) == 1 and 2 <= int(ckpts[0].name.split("-")[1]) < 8
    causal_train.main(argv + ["--resume"])
    full = tmp_path / "full"
    causal_train.main(checkpointed_argv(distill_setup, full, 4, "--num_workers", "1", "--checkpoint_interval", "0", "--max_steps", "8"))
    assert_same_weights(student_weights(tmp_path / "cut"), student_weights(full))


def test_worker_death_while_stopping_still_ends_in_the_stop_checkpoint(distill_setup, tmp_path, monkeypatch):
    """A worker that dies anyway while the run stops: the rest of the step is collated in-process."""
    original = lm_seqs_dataset.make_loader

    def dying_loader(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # the stop was asked for (the trainer's handler takes it) ...
        for i, batch in enumerate(original(*args)):
            if i == 1:  # ... and the worker died of it
                raise RuntimeError("DataLoader worker (pid 1234) is killed by signal: Terminated.")
            yield batch

    monkeypatch.setattr(lm_seqs_dataset, "make_loader", dying_loader)
    dump = tmp_path / "die"
    with pytest.raises(SystemExit) as stop:
        causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--gradient_accumulation_steps", "3", "--checkpoint_interval", "0"))
    assert stop.value.code == 128 + signal.SIGTERM
    assert [p.name for p in checkpoints.list_checkpoints(dump)] == ["checkpoint-1"]


@pytest.mark.e2e
def test_sigterm_finishes_step_writes_checkpoint_and_resumes(distill_setup, tmp_path):
    dump = tmp_path / "term"
    argv = two_epoch_argv(distill_setup, dump)
    argv[argv.index("--checkpoint_interval") + 1] = "0"
    proc = subprocess.Popen([sys.executable, "causal_train.py", *argv], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    log = []
    for line in proc.stdout:  # wait until training has begun
        log.append(line)
        if "step 4 |" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    log = "".join(log) + rest
    assert proc.returncode == 128 + signal.SIGTERM, log[-3000:]
    assert "received SIGTERM" in log and "--resume" in log
    ckpts = list(dump.glob("checkpoint-*"))
    assert len(ckpts) == 1 and ckpts[0].name != "checkpoint-0"
    causal_train.main(argv + ["--resume"])
    assert (dump / "model.safetensors").is_file()
