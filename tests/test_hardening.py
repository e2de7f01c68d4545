"""Preemption of the whole process group, --force, full disks, leftovers, verified checkpoints and data,
extending a finished run, untrusted token counts (issue 12; issue 13 item 4)."""
import errno
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT
from helpers import SUBPROCESS_ENV, assert_same_weights, student_weights, train_argv

import causal_distiller
import causal_train
import checkpoints
import lm_seqs_dataset
from binarized_io import HEADER_SIZE, CorpusWriter, load_corpus, load_token_counts
from checkpoints import load_training_state
from utils import CliError


def _argv(distill_setup, dump, *extra):
    return train_argv(distill_setup, dump, "--max_steps", "4", "--checkpoint_interval", "1", "--log_interval", "1", *extra)


# --- preemption -----------------------------------------------------------------------------------

@pytest.mark.e2e
def test_sigterm_to_the_process_group_with_a_worker_checkpoints_and_resumes_exactly(distill_setup, tmp_path, one_thread):
    """What Slurm, Kubernetes and docker stop do: SIGTERM to every process of the group, DataLoader worker included."""
    argv = _argv(distill_setup, tmp_path / "cut", "--num_workers", "1", "--checkpoint_interval", "0", "--max_steps", "8")
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
    causal_train.main(_argv(distill_setup, full, "--num_workers", "1", "--checkpoint_interval", "0", "--max_steps", "8"))
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
        causal_train.main(_argv(distill_setup, dump, "--gradient_accumulation_steps", "3", "--checkpoint_interval", "0"))
    assert stop.value.code == 128 + signal.SIGTERM
    assert [p.name for p in checkpoints.list_checkpoints(dump)] == ["checkpoint-1"]


# --- --force -----------------------------------------------------------------------------------------

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
        causal_train.main(_argv(distill_setup, dump, "--force", "--max_steps", "2"))
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
    causal_train.main(_argv(distill_setup, link, "--force", "--max_steps", "2"))
    assert f"--dump_path {link} is a link to {target}: the run writes there" in caplog.text
    assert f"--force: removed the previous contents ({tmp_path / '.real.replaced'})" in caplog.text
    assert link.is_symlink() and link.resolve() == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    assert student_weights(target) and json.loads((target / "parameters.json").read_text())["max_steps"] == 2


def test_force_checks_every_input_before_touching_the_previous_run(distill_setup, tmp_path):
    dump = _previous_run(tmp_path / "run")
    with pytest.raises(CliError, match="--data_file"):
        causal_train.main(_argv(distill_setup, dump, "--force", "--data_file", str(tmp_path / "typo.bin")))
    assert (dump / "model.safetensors").read_bytes() == b"weights of a week-long run"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_force_restores_the_previous_run_when_failing_before_the_first_checkpoint(distill_setup, tmp_path, monkeypatch):
    dump = _previous_run(tmp_path / "run")

    def crash(self):
        assert not (dump / "model.safetensors").exists(), "moved aside while the new run works"
        raise CliError("out of memory at step 1")

    monkeypatch.setattr(causal_distiller.CausalDistiller, "train", crash)
    with pytest.raises(CliError):
        causal_train.main(_argv(distill_setup, dump, "--force"))
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
    causal_train.main(_argv(distill_setup, dump, "--force", "--max_steps", "2"))
    assert seen[0] == [".run.lock", ".run.replaced", "run"] and seen[1] == [".run.lock", "run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert student_weights(dump)  # the new student replaced the old file


def test_a_failed_run_leaves_no_folder_behind(distill_setup, tmp_path):
    with pytest.raises(CliError):
        causal_train.main(_argv(distill_setup, tmp_path / "new" / "run", "--token_counts", str(tmp_path / "none.pickle")))
    assert not (tmp_path / "new" / "run").exists()


# --- full disk, limits, leftovers ---------------------------------------------------------------------

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
        causal_train.main(_argv(distill_setup, dump))
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
    causal_train.main(_argv(distill_setup, dump, "--save_total_limit", "2"))
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
    causal_train.main(_argv(distill_setup, dump, "--save_total_limit", "2", "--max_steps", "3"))
    assert seen[2:] == [("checkpoint-3", ["checkpoint-1", "checkpoint-2"]), ("checkpoint-3", ["checkpoint-2"])]
    assert [p.name for p in checkpoints.list_checkpoints(dump)] == ["checkpoint-2", "checkpoint-3"]


def test_limit_one_never_frees_the_newest_checkpoint(distill_setup, tmp_path, monkeypatch):
    _enospc_at(monkeypatch, "checkpoint-3")
    dump = tmp_path / "limit1"
    with pytest.raises(CliError, match="no space left on device at .*checkpoint-3; the previous checkpoint"):
        causal_train.main(_argv(distill_setup, dump, "--save_total_limit", "1", "--max_steps", "3"))
    assert [p.name for p in checkpoints.list_checkpoints(dump)] == ["checkpoint-2"]


def test_stale_temporaries_are_cleaned_and_no_empty_final_folder(distill_setup, tmp_path):
    dump = tmp_path / "stale"
    causal_train.main(_argv(distill_setup, dump, "--max_steps", "1"))
    (dump / ".checkpoint-7.x1y2.tmp").mkdir()
    (dump / ".checkpoint-7.old").mkdir()
    (dump / ".final").mkdir()  # what older versions left
    (dump / ".model.safetensors.abc.tmp").write_bytes(b"half")
    causal_train.main(_argv(distill_setup, dump, "--resume", "--max_steps", "2"))
    assert not [p.name for p in dump.iterdir() if p.name.startswith(".")]
    # and the corpus writer cleans the temporaries of the file it writes
    out = tmp_path / "c.bin"
    (tmp_path / ".c.bin.q9.tmp").write_bytes(b"half")
    with CorpusWriter(out, vocab_size=100) as w:
        w.add([1, 2, 3])
    assert sorted(p.name for p in tmp_path.glob(".c.bin*")) == []


# --- verified checkpoints -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def three_checkpoints(distill_setup, tmp_path_factory):
    dump = tmp_path_factory.mktemp("three") / "run"
    causal_train.main(_argv(distill_setup, dump, "--max_steps", "3"))
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
    causal_train.main(_argv(distill_setup, dump, "--resume", "--max_steps", "3"))
    assert "resuming from" in caplog.text and "checkpoint-2, the newest sound checkpoint (skipped: checkpoint-3: model.safetensors" in caplog.text
    assert "resumed from %s: epoch 0, step 2" % (dump / "checkpoint-2") in caplog.text
    assert_same_weights(student_weights(dump), student_weights(three_checkpoints))  # step 3 redone, the same weights
    assert checkpoints.checkpoint_problem(dump / "checkpoint-3") is None  # and rewritten sound


def test_resume_from_a_damaged_checkpoint_is_an_error(distill_setup, three_checkpoints, tmp_path):
    dump = tmp_path / "run"
    shutil.copytree(three_checkpoints, dump)
    _damage(dump / "checkpoint-2" / "training_state.pt", "truncated")
    with pytest.raises(CliError, match=r"--resume_from .*checkpoint-2 is damaged or incomplete: training_state.pt has"):
        causal_train.main(_argv(distill_setup, dump, "--resume_from", str(dump / "checkpoint-2")))


def test_extending_a_finished_run_with_a_larger_max_steps(distill_setup, three_checkpoints, tmp_path, caplog):
    """Issue 13.4: every run ends with a checkpoint, and --resume with more steps continues it."""
    dump = tmp_path / "run"
    shutil.copytree(three_checkpoints, dump)
    caplog.set_level("INFO")
    causal_train.main(_argv(distill_setup, dump, "--resume", "--max_steps", "5"))
    assert "resumed from %s: epoch 0, step 3" % (dump / "checkpoint-3") in caplog.text
    assert [p.name for p in checkpoints.list_checkpoints(dump)][-2:] == ["checkpoint-4", "checkpoint-5"]
    state = load_training_state(dump / "checkpoint-5" / "training_state.pt")
    assert state["n_step"] == 5


# --- data checksum ----------------------------------------------------------------------------------

def test_a_token_changed_mid_file_is_detected(tmp_path):
    """Beyond the first and last MiB that the cheap fingerprint reads: only the full checksum sees it."""
    path = tmp_path / "big.bin"
    rng = np.random.default_rng(0)
    with CorpusWriter(path, vocab_size=1000, shuffle=False) as w:
        for _ in range(1500):
            w.add(rng.integers(0, 1000, 1000))
    assert load_corpus(path).verify_checksum()
    before = checkpoints.file_fingerprint(path)
    mid = HEADER_SIZE + 1_500_000
    with open(path, "r+b") as fh:
        fh.seek(mid)
        byte = fh.read(1)
        fh.seek(mid)
        fh.write(bytes([byte[0] ^ 1]))
    after = checkpoints.file_fingerprint(path)
    assert after["sha256_head_tail"] == before["sha256_head_tail"]
    with pytest.raises(CliError, match="differ from the checksum recorded"):
        load_corpus(path).verify_checksum()
    with pytest.raises(CliError, match="changed while the run used it"):
        checkpoints.check_fingerprint(path, before, after)


def test_a_bin_written_before_checksums_still_loads(tmp_path):
    import json

    import binarized_io as bio

    path = tmp_path / "old.bin"
    with CorpusWriter(path, vocab_size=100, shuffle=False) as w:
        w.add([1, 2, 3])
    head = bytearray(path.read_bytes()[:HEADER_SIZE])
    fields = list(bio._HEADER.unpack_from(head))
    meta = json.loads(head[bio._HEADER.size: bio._HEADER.size + fields[-1]])
    del meta[bio.CHECKSUM_KEY]  # what the previous version wrote
    blob = json.dumps(meta).encode()
    fields[-1] = len(blob)
    head[:] = b"\0" * HEADER_SIZE
    head[: bio._HEADER.size + len(blob)] = bio._HEADER.pack(*fields) + blob
    path.write_bytes(bytes(head) + path.read_bytes()[HEADER_SIZE:])
    corpus = load_corpus(path)
    assert corpus.recorded_checksum is None and corpus.verify_checksum() is False
    assert corpus[0].tolist() == [1, 2, 3]


def test_causal_train_checks_the_recorded_checksum_at_start(distill_setup, tmp_path):
    data = tmp_path / "data.bin"
    shutil.copy(distill_setup["data"], data)
    corpus = load_corpus(data)
    pos = HEADER_SIZE + 2 * int(corpus.starts[0] + 3)  # a token inside the first sequence (uint16)
    with open(data, "r+b") as fh:
        fh.seek(pos)
        fh.write(b"\x07\x00")
    with pytest.raises(CliError, match="data.bin: the tokens differ from the checksum"):
        causal_train.main(_argv(distill_setup, tmp_path / "r", "--data_file", str(data)))


# --- untrusted token counts --------------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_token_counts_pickle_cannot_run_code(distill_setup, tmp_path):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "counts.pickle"
    with open(crafted, "wb") as fh:
        pickle.dump([1, 2, _Payload(marker)], fh)
    with pytest.raises(CliError, match="counts.pickle: not a token counts file"):
        causal_train.main(_argv(distill_setup, tmp_path / "r", "--token_counts", str(crafted)))
    assert not marker.exists()


def test_token_counts_as_npy(distill_setup, tmp_path):
    import token_counts

    npy = tmp_path / "counts.npy"
    token_counts.main(["--data_file", str(distill_setup["data"]), "--token_counts_dump", str(npy)])
    assert load_token_counts(npy).tolist() == load_token_counts(distill_setup["counts"]).tolist()
    causal_train.main(_argv(distill_setup, tmp_path / "r", "--token_counts", str(npy), "--max_steps", "1"))
    assert (tmp_path / "r" / "model.safetensors").is_file()


# --- models and tokenizer ------------------------------------------------------------------------------

def test_teacher_without_its_lm_head_is_an_error(distill_setup, tmp_path):
    from transformers import BertModel

    headless = tmp_path / "headless"
    BertModel.from_pretrained(distill_setup["teacher"]).save_pretrained(headless)
    with pytest.raises(CliError, match=r"headless lacks weights of BertForMaskedLM .*cls\.predictions"):
        causal_train.main(_argv(distill_setup, tmp_path / "r", "--teacher_name", str(headless),
                                "--tokenizer_name", str(distill_setup["teacher"])))


def test_corpus_of_another_tokenizer_is_an_error_unless_allowed(distill_setup, tmp_path, caplog):
    data = tmp_path / "other.bin"
    corpus = load_corpus(distill_setup["data"])
    with CorpusWriter(data, vocab_size=corpus.vocab_size, vocab_hash="0123456789abcdef", shuffle=False) as w:
        for seq in corpus:
            w.add(seq)
    argv = _argv(distill_setup, tmp_path / "r", "--data_file", str(data), "--max_steps", "1")
    with pytest.raises(CliError, match="other.bin was binarized with another tokenizer .*vocabulary fingerprint "
                                       "0123456789abcdef vs .*--allow_tokenizer_mismatch"):
        causal_train.main(argv)
    causal_train.main(argv + ["--allow_tokenizer_mismatch"])
    assert "going on (--allow_tokenizer_mismatch)" in caplog.text


# --- the original's training-loop bugs, pinned ----------------------------------------------------------

def test_same_command_twice_gives_bitwise_equal_students(distill_setup, three_checkpoints, tmp_path):
    """--seed seeds Python's random too (the step's mapping entry is drawn with it); the original did not."""
    causal_train.main(_argv(distill_setup, tmp_path / "again", "--max_steps", "3"))
    assert_same_weights(student_weights(tmp_path / "again"), student_weights(three_checkpoints))


def test_crossway_with_accumulation_steps_once_per_window(distill_setup, tmp_path, caplog):
    """The original stepped the optimiser and the schedule for each direction of a crossway pair."""
    dump = tmp_path / "cross"
    caplog.set_level("INFO")
    causal_train.main(train_argv(distill_setup, dump, "--include_crossway", "--gradient_accumulation_steps", "2",
                                 "--checkpoint_interval", "0", "--batch_size", "16"))
    state = load_training_state(checkpoints.list_checkpoints(dump)[-1] / "training_state.pt")
    assert state["batch_in_epoch"] == 0 and state["epoch"] == 1
    (n_batches,) = [int(m.group(1)) for r in caplog.records if (m := re.search(r"\((\d+) batches per epoch", r.getMessage()))]
    assert n_batches > 2
    assert state["n_step"] == -(-n_batches // 2)
    assert state["scheduler"]["last_epoch"] == state["n_step"]
    assert all(int(s["step"]) == state["n_step"] for s in state["optimizer"]["state"].values())
    # the run ended with its epoch: the epoch-end checkpoint is the final one, written once
    assert len(checkpoints.list_checkpoints(dump)) == 1
