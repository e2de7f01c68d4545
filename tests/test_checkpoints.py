"""checkpoints.py and training_checkpoints.py: a checkpoint holds everything a continuation needs and nothing that
runs code; it is sealed by its manifest, written atomically, pruned within --save_total_limit and on a full disk; a
damaged one is named and skipped; a resume (after kill -9 too) ends bitwise where the uninterrupted run ends."""
from __future__ import annotations

import errno
import json
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT
from helpers import (
    SUBPROCESS_ENV,
    Payload,
    assert_same_weights,
    checkpointed_argv,
    student_weights,
    two_epoch_argv,
)

import causal_train
import checkpoints
from binarized_io import CorpusWriter
from checkpoints import load_training_state
from utils import CliError


@pytest.mark.parametrize("manifest", ["recomputed", "deleted"])
def test_a_crafted_training_state_runs_nothing(distill_setup, run_copy, tmp_path, manifest):
    marker = tmp_path / "pwned"
    folder = run_copy / "checkpoint-3"
    state = checkpoints.load_training_state(folder / "training_state.pt")
    state["payload"] = Payload(marker)
    torch.save(state, folder / "training_state.pt")
    if manifest == "recomputed":  # an attacker recomputes the checksums...
        checkpoints.write_manifest(folder)
        with pytest.raises(CliError) as err:
            causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--resume_from", str(folder)))
        assert "cannot read training_state.pt (refused by weights-only loading: it needs posix.system" in str(err.value)
        assert "Re-running" not in str(err.value) and "\n" not in str(err.value)  # not torch's advice to unpickle
    else:  # ... or deletes the manifest: then the checkpoint is damaged and skipped
        (folder / "manifest.json").unlink()
        with pytest.raises(CliError, match=r"--resume_from .*checkpoint-3 is damaged or incomplete: manifest.json is "
                                           r"missing"):
            causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--resume_from", str(folder)))
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
        causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--resume_from", str(folder)))
    assert f"checkpoint {folder} is damaged" in str(err.value) and message in str(err.value), str(err.value)


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
    causal_train.main(checkpointed_argv(distill_setup, run_copy, 3, "--resume"))
    warning = next(r.getMessage() for r in caplog.records if "is damaged or incomplete" in r.getMessage())
    assert warning.startswith(f"checkpoint {folder} is damaged or incomplete: ") and message in warning, warning
    assert f"resumed from {run_copy / 'checkpoint-2'}" in caplog.text
    assert_same_weights(student_weights(run_copy), student_weights(three_steps))


def test_disk_full_while_writing_the_weights_names_the_intact_checkpoint(distill_setup, tmp_path, monkeypatch):
    import safetensors
    import transformers.modeling_utils as mu

    calls = {"n": 0}
    original = mu.safe_save_file

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise safetensors.SafetensorError("Error while serializing: No space left on device (os error 28)")
        return original(*a, **k)

    monkeypatch.setattr(mu, "safe_save_file", full_disk)
    dump = tmp_path / "full"
    with pytest.raises(CliError) as err:
        causal_train.main(checkpointed_argv(distill_setup, dump, 4))
    assert str(err.value) == (f"no space left on device at {dump / 'checkpoint-3'}; the previous checkpoint "
                              f"{dump / 'checkpoint-2'} is intact; free space and resume with --resume "
                              f"(it continues from {dump / 'checkpoint-2'})")
    assert [p.name for p in checkpoints.list_checkpoints(dump)] == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in dump.iterdir() if p.name.startswith(".")]


def test_save_total_limit_frees_the_oldest_first_when_the_disk_is_short(distill_setup, tmp_path, monkeypatch):
    seen = []
    original = checkpoints.CheckpointWriter._write

    def spy(self, target, student, state):
        seen.append((target.name, sorted(p.name for p in checkpoints.list_checkpoints(self.dump_path))))
        return original(self, target, student, state)

    monkeypatch.setattr(checkpoints.CheckpointWriter, "_write", spy)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=0))
    dump = tmp_path / "limit"
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--save_total_limit", "2"))
    # before writing checkpoint-n only checkpoint-(n-1) is left: the limit's victim went first
    assert seen == [("checkpoint-1", []), ("checkpoint-2", ["checkpoint-1"]), ("checkpoint-3", ["checkpoint-2"]),
                    ("checkpoint-4", ["checkpoint-3"])]
    assert [p.name for p in checkpoints.list_checkpoints(dump)] == ["checkpoint-3", "checkpoint-4"]


def _enospc_at(monkeypatch, name):
    seen, failed = [], []
    original = checkpoints.CheckpointWriter._write

    def spy(self, target, student, state):
        seen.append((target.name, sorted(p.name for p in checkpoints.list_checkpoints(self.dump_path))))
        if target.name == name and not failed:
            failed.append(1)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, target, student, state)

    monkeypatch.setattr(checkpoints.CheckpointWriter, "_write", spy)
    return seen


def test_enospc_frees_the_checkpoint_beyond_the_limit_and_retries(distill_setup, tmp_path, monkeypatch):
    seen = _enospc_at(monkeypatch, "checkpoint-3")
    dump = tmp_path / "limit2"
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--save_total_limit", "2", "--max_steps", "3"))
    assert seen[2:] == [("checkpoint-3", ["checkpoint-1", "checkpoint-2"]), ("checkpoint-3", ["checkpoint-2"])]
    assert [p.name for p in checkpoints.list_checkpoints(dump)] == ["checkpoint-2", "checkpoint-3"]


def test_limit_one_never_frees_the_newest_checkpoint(distill_setup, tmp_path, monkeypatch):
    _enospc_at(monkeypatch, "checkpoint-3")
    dump = tmp_path / "limit1"
    with pytest.raises(CliError, match="no space left on device at .*checkpoint-3; the previous checkpoint"):
        causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--save_total_limit", "1", "--max_steps", "3"))
    assert [p.name for p in checkpoints.list_checkpoints(dump)] == ["checkpoint-2"]


def test_stale_temporaries_are_cleaned_and_no_empty_final_folder(distill_setup, tmp_path):
    dump = tmp_path / "stale"
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--max_steps", "1"))
    (dump / ".checkpoint-7.x1y2.tmp").mkdir()
    (dump / ".checkpoint-7.old").mkdir()
    (dump / ".final").mkdir()  # what older versions left
    (dump / ".model.safetensors.abc.tmp").write_bytes(b"half")
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--resume", "--max_steps", "2"))
    assert not [p.name for p in dump.iterdir() if p.name.startswith(".")]
    # and the corpus writer cleans the temporaries of the file it writes
    out = tmp_path / "c.bin"
    (tmp_path / ".c.bin.q9.tmp").write_bytes(b"half")
    with CorpusWriter(out, vocab_size=100) as w:
        w.add([1, 2, 3])
    assert sorted(p.name for p in tmp_path.glob(".c.bin*")) == []


@pytest.fixture(scope="module")
def three_checkpoints(distill_setup, tmp_path_factory):
    dump = tmp_path_factory.mktemp("three") / "run"
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--max_steps", "3"))
    return dump


def _damage(path, kind):
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # one bit flipped in the middle: same size
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 1]) + data[i + 1:])


@pytest.mark.parametrize("name", ["model.safetensors", "training_state.pt"])
@pytest.mark.parametrize("kind", ["truncated", "empty", "bitflip"])
def test_damaged_newest_checkpoint_is_named_and_skipped(three_checkpoints, tmp_path, name, kind, caplog):
    dump = tmp_path / "run"
    shutil.copytree(three_checkpoints, dump)
    assert checkpoints.checkpoint_problem(dump / "checkpoint-3") is None
    _damage(dump / "checkpoint-3" / name, kind)
    assert name in checkpoints.checkpoint_problem(dump / "checkpoint-3")
    assert checkpoints.find_resume_checkpoint(dump).name == "checkpoint-2"
    assert f"checkpoint {dump / 'checkpoint-3'} is damaged or incomplete: {name}" in caplog.text


def test_resume_falls_back_to_the_newest_sound_checkpoint(distill_setup, three_checkpoints, tmp_path, caplog):
    dump = tmp_path / "run"
    shutil.copytree(three_checkpoints, dump)
    _damage(dump / "checkpoint-3" / "model.safetensors", "bitflip")
    caplog.set_level("INFO")
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--resume", "--max_steps", "3"))
    assert "resuming from" in caplog.text and "checkpoint-2, the newest sound checkpoint (skipped: checkpoint-3: model.safetensors" in caplog.text
    assert "resumed from %s: epoch 0, step 2" % (dump / "checkpoint-2") in caplog.text
    assert_same_weights(student_weights(dump), student_weights(three_checkpoints))  # step 3 redone, the same weights
    assert checkpoints.checkpoint_problem(dump / "checkpoint-3") is None  # and rewritten sound


def test_resume_from_a_damaged_checkpoint_is_an_error(distill_setup, three_checkpoints, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(three_checkpoints, dump)
    _damage(dump / "checkpoint-2" / "training_state.pt", "truncated")
    with pytest.raises(CliError, match=r"--resume_from .*checkpoint-2 is damaged or incomplete: training_state.pt has"):
        causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--resume_from", str(dump / "checkpoint-2")))


def test_extending_a_finished_run_with_a_larger_max_steps(distill_setup, three_checkpoints, tmp_path, caplog):
    """Issue 13.4: every run ends with a checkpoint, and --resume with more steps continues it."""
    dump = tmp_path / "run"
    shutil.copytree(three_checkpoints, dump)
    caplog.set_level("INFO")
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--resume", "--max_steps", "5"))
    assert "resumed from %s: epoch 0, step 3" % (dump / "checkpoint-3") in caplog.text
    assert [p.name for p in checkpoints.list_checkpoints(dump)][-2:] == ["checkpoint-4", "checkpoint-5"]
    state = load_training_state(dump / "checkpoint-5" / "training_state.pt")
    assert state["n_step"] == 5


def test_same_command_twice_gives_bitwise_equal_students(distill_setup, three_checkpoints, tmp_path):
    """--seed seeds Python's random too (the step's mapping entry is drawn with it); the original did not."""
    causal_train.main(checkpointed_argv(distill_setup, tmp_path / "again", 4, "--max_steps", "3"))
    assert_same_weights(student_weights(tmp_path / "again"), student_weights(three_checkpoints))


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
    argv = two_epoch_argv(distill_setup, full)
    argv[argv.index("--checkpoint_interval") + 1] = "0"
    causal_train.main(argv)
    steps = max(int(p.name.split("-")[1]) for p in full.glob("checkpoint-*"))
    assert steps >= 12

    # the same run, killed hard once a checkpoint of the middle of epoch 1 exists
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "causal_train.py", *two_epoch_argv(distill_setup, cut)], cwd=ROOT, env=SUBPROCESS_ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = cut / f"checkpoint-{steps // 2 + 1}"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.exists(), "the run ended before the kill"
    assert not (cut / "model.safetensors").exists() or len(list(cut.glob("checkpoint-*"))) < steps

    causal_train.main(two_epoch_argv(distill_setup, cut, "--resume"))
    assert_same_weights(student_weights(cut), student_weights(full))


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
        causal_train.main(two_epoch_argv(distill_setup, dump))
    assert sorted(p.name for p in dump.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not [p for p in dump.iterdir() if p.name.endswith(".tmp")], "no half-written folder is left"
    # a folder that looks like a checkpoint but lacks its state is never resumed from
    fake = dump / "checkpoint-99"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"\x00" * 10)
    assert checkpoints.list_checkpoints(dump)[-1].name == "checkpoint-2"
