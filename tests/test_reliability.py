"""Fault injection: kill -9 then --resume equals the uninterrupted run, SIGTERM writes a checkpoint,
NaN losses stop (or are skipped), checkpoint writes are atomic, damaged inputs are detected."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from helpers import SUBPROCESS_ENV, assert_same_weights, student_weights, train_argv

import causal_distiller
import causal_train
import checkpoints
from checkpoints import load_training_state
from utils import CliError


def _argv(distill_setup, dump, *extra):
    # 2 epochs of ~35 batches of 8 would be long; batch 16 keeps ~18 batches an epoch.
    return train_argv(distill_setup, dump, "--batch_size", "16", "--n_epoch", "2", "--checkpoint_interval", "1",
                      "--log_interval", "4", "--gradient_accumulation_steps", "2", "--include_crossway", *extra)


@pytest.mark.e2e
def test_kill9_then_resume_equals_uninterrupted(distill_setup, tmp_path, monkeypatch):
    # One thread everywhere, as in the killed subprocess: bitwise equality needs the same kernels.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _kill9_then_resume(distill_setup, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _kill9_then_resume(distill_setup, tmp_path):
    full = tmp_path / "full"
    argv = _argv(distill_setup, full)
    argv[argv.index("--checkpoint_interval") + 1] = "0"
    causal_train.main(argv)
    steps = max(int(p.name.split("-")[1]) for p in full.glob("checkpoint-*"))
    assert steps >= 12

    # the same run, killed hard once a checkpoint of the middle of epoch 1 exists
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "causal_train.py", *_argv(distill_setup, cut)], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = cut / f"checkpoint-{steps // 2 + 1}"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run ended before the kill"
    assert not (cut / "model.safetensors").exists() or len(list(cut.glob("checkpoint-*"))) < steps

    causal_train.main(_argv(distill_setup, cut, "--resume"))
    assert_same_weights(student_weights(cut), student_weights(full))


@pytest.mark.e2e
def test_sigterm_finishes_step_writes_checkpoint_and_resumes(distill_setup, tmp_path):
    dump = tmp_path / "term"
    argv = _argv(distill_setup, dump)
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


def _nan_at(monkeypatch, call_number):
    original = causal_distiller.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        values, total = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call_number:
            values["causal_ce"] = values["causal_ce"] * float("nan")
            total = total * float("nan")
        return values, total

    monkeypatch.setattr(causal_distiller, "compute_losses", poisoned)


@pytest.mark.e2e
def test_nan_stops_with_last_good_checkpoint(distill_setup, tmp_path, monkeypatch, caplog):
    # 2 pairs (crossway) x 2 micro-batches per step: call 9 is in step 3
    _nan_at(monkeypatch, 9)
    dump = tmp_path / "nan"
    argv = _argv(distill_setup, dump)
    argv[argv.index("--checkpoint_interval") + 1] = "0"
    with pytest.raises(SystemExit) as exit_info:
        causal_train.main(argv)
    assert exit_info.value.code == 3
    assert "step 3: non-finite loss in causal_ce" in caplog.text
    assert [p.name for p in dump.glob("checkpoint-*")] == ["checkpoint-2"]
    state = load_training_state(dump / "checkpoint-2" / "training_state.pt")
    assert state["n_step"] == 2
    for w in student_weights(dump / "checkpoint-2").values():
        assert torch.isfinite(w).all()


def test_nan_skipped_with_flag(distill_setup, tmp_path, monkeypatch, caplog):
    _nan_at(monkeypatch, 9)
    dump = tmp_path / "skip"
    caplog.set_level("INFO")
    causal_train.main(_argv(distill_setup, dump, "--skip_nonfinite_steps", "1", "--max_steps", "5"))
    assert "step skipped (1/1 skips used)" in caplog.text
    assert all(torch.isfinite(w).all() for w in student_weights(dump).values())


def test_crash_while_writing_checkpoint_leaves_previous_intact(distill_setup, tmp_path, monkeypatch):
    dump = tmp_path / "crash"
    calls = {"n": 0}
    original = torch.save

    def failing_save(obj, path, *a, **k):
        if "training_state" in str(path):
            calls["n"] += 1
            if calls["n"] == 3:
                raise OSError(28, "No space left on device")
        return original(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CliError, match="no space left on device at .*checkpoint-3; the previous checkpoint .*checkpoint-2 is intact"):
        causal_train.main(_argv(distill_setup, dump))
    assert sorted(p.name for p in dump.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in dump.iterdir() if p.name.endswith(".tmp")], "no half-written folder is left"
    # a folder that looks like a checkpoint but lacks its state is never resumed from
    fake = dump / "checkpoint-99"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoints.list_checkpoints(dump)[-1].name == "checkpoint-2"


def test_data_file_changed_under_the_run_is_detected(distill_setup, tmp_path):
    import shutil

    data = tmp_path / "data.bin"
    shutil.copy(distill_setup["data"], data)
    dump = tmp_path / "changed"
    argv = _argv(distill_setup, dump, "--data_file", str(data), "--max_steps", "2")
    causal_train.main(argv)
    with open(data, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x07\x00")
    with pytest.raises(CliError, match="changed while the run used it"):
        causal_train.main(argv + ["--resume"])


def test_truncated_data_file_is_an_error(distill_setup, tmp_path):
    data = tmp_path / "short.bin"
    data.write_bytes(Path(distill_setup["data"]).read_bytes()[:-100])
    with pytest.raises(CliError, match="short.bin"):
        causal_train.main(_argv(distill_setup, tmp_path / "t", "--data_file", str(data)))


def test_out_of_memory_names_the_batch(distill_setup, tmp_path, monkeypatch):
    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(causal_distiller.CausalDistiller, "losses_for_batch", oom)
    with pytest.raises(CliError, match=r"out of memory at step 1 on a batch of shape \(16, \d+\).*--batch_size"):
        causal_train.main(_argv(distill_setup, tmp_path / "oom"))
