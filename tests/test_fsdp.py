"""causal_train.py --fsdp (PyTorch FSDP2) on the CPU: torchrun with 2 processes and gloo.

FSDP and DDP give the same losses and student weights (fp32, DIITO on) for a BERT and a Llama pair;
a run killed with kill -9, then stopped by SIGTERM to its process group, resumes to the weights of
the run that never stopped (bitwise); the sharded checkpoints are verified by their manifest and
their consolidation reloads equal; every family's interventions work on sharded blocks
(`fsdp_families_check.py`); misuse is one clear error.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from clm_helpers import llama_distill_setup, llama_train_argv
from conftest import ROOT
from helpers import SUBPROCESS_ENV, Payload, assert_same_weights, free_port, student_weights, train_argv

import causal_train
from utils import CliError


def torchrun(argv: list[str], nproc: int = 2, script: str = "causal_train.py", timeout: int = 280, **popen):
    """Run `script` under torchrun with `nproc` CPU processes; returns the CompletedProcess (output as text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), script, *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=SUBPROCESS_ENV, timeout=timeout, **popen)


def signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to torchrun (`pid`) and to every process under it, as a node failure does (SIGKILL): torchrun
    starts each rank in a session of its own, so a signal to torchrun's process group reaches the ranks only
    through torchrun, which passes SIGTERM on and cannot pass SIGKILL on."""
    import psutil

    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for proc in procs:
        try:
            proc.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def step_losses(log: str) -> dict[int, dict[str, float]]:
    """The losses of each logged step ("step N | ce x mlm y ... loss z | lr ..."), from rank 0's log lines."""
    out = {}
    for match in re.finditer(r"step (\d+) \| ((?:\w+ [-\d.e+]+ ?)+)\|", log):
        parts = match.group(2).split()
        out[int(match.group(1))] = {parts[i]: float(parts[i + 1]) for i in range(0, len(parts), 2)}
    return out


def assert_close_runs(ddp_log: str, fsdp_log: str, ddp_dump, fsdp_dump) -> None:
    """The same losses at every logged step and the same final weights, within fp32 rounding."""
    a, b = step_losses(ddp_log), step_losses(fsdp_log)
    assert a and a.keys() == b.keys(), (a, b)
    for step in a:
        assert a[step].keys() == b[step].keys()
        for name in a[step]:
            assert b[step][name] == pytest.approx(a[step][name], rel=2e-4, abs=2e-4), (step, name)
    wa, wb = student_weights(ddp_dump), student_weights(fsdp_dump)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=2e-5, msg=k)


BERT_STEPS = 8


def _bert_argv(setup, dump, *extra):
    return train_argv(setup, dump, "--max_steps", str(BERT_STEPS), "--include_crossway", "--log_interval", "1",
                      *extra)


@pytest.fixture(scope="module")
def bert_runs(distill_setup, tmp_path_factory):
    """The BERT -> DistilBERT pair (DIITO on, with the reversed pairs) trained for 8 steps by DDP and by FSDP,
    2 ranks each (Llama's test accumulates gradients)."""
    root = tmp_path_factory.mktemp("fsdp_bert")
    runs = {}
    for engine, flags in (("ddp", ()), ("fsdp", ("--fsdp",))):
        dump = root / engine
        out = torchrun(_bert_argv(distill_setup, dump, "--checkpoint_interval", "4", *flags))
        log = out.stdout + out.stderr
        assert out.returncode == 0, log[-4000:]
        runs[engine] = (dump, log)
    return runs


@pytest.mark.e2e
def test_fsdp_matches_ddp_for_a_bert_pair(bert_runs):
    (ddp, ddp_log), (fsdp, fsdp_log) = bert_runs["ddp"], bert_runs["fsdp"]
    assert_close_runs(ddp_log, fsdp_log, ddp, fsdp)
    assert "causal_ce" in step_losses(fsdp_log)[BERT_STEPS]
    # the checkpoints are sharded: one file of shards per rank, DCP's index, the state, the config, the manifest
    ckpt = fsdp / f"checkpoint-{BERT_STEPS}"
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"__0_0.distcp", "__1_0.distcp", ".metadata", "training_state.pt", "config.json", "manifest.json"}
    assert set(json.loads((ckpt / "manifest.json").read_text())["files"]) == names - {"manifest.json"}
    state = torch.load(ckpt / "training_state.pt", weights_only=True)  # plain data: no unpickling of objects
    assert state["n_step"] == BERT_STEPS and state["world_size"] == 2 and state["has_optimizer_state"]
    # the final student is one consolidated HF folder of the stock class, tied weights saved once
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(fsdp)
    assert type(model).__name__ == "DistilBertForMaskedLM"
    assert json.loads((fsdp / "config.json").read_text())["architectures"] == ["DistilBertForMaskedLM"]
    assert student_weights(fsdp).keys() == student_weights(ddp).keys()
    assert_same_weights({k: v for k, v in model.state_dict().items() if k in student_weights(fsdp)},
                        student_weights(fsdp))


@pytest.mark.e2e
def test_fsdp_with_a_sharded_teacher_matches_ddp_for_a_llama_pair(tmp_path, corpus_lines):
    data, _ = llama_distill_setup(tmp_path, corpus_lines)
    logs = {}
    for engine, flags in (("ddp", ()), ("fsdp", ("--fsdp", "--fsdp_teacher"))):
        argv = llama_train_argv(tmp_path, data, "--log_interval", "1", "--gradient_accumulation_steps", "2",
                                "--checkpoint_interval", "0", *flags)
        argv[argv.index("--dump_path") + 1] = str(tmp_path / engine)
        out = torchrun(argv)
        logs[engine] = out.stdout + out.stderr
        assert out.returncode == 0, logs[engine][-4000:]
    assert_close_runs(logs["ddp"], logs["fsdp"], tmp_path / "ddp", tmp_path / "fsdp")
    assert " clm " in logs["fsdp"] and " causal_cos " in logs["fsdp"]
    from transformers import AutoModelForCausalLM

    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp")).__name__ == "LlamaForCausalLM"


@pytest.mark.e2e
def test_fsdp_kill9_then_sigterm_then_resume_equals_uninterrupted(bert_runs, distill_setup, tmp_path):
    full, _ = bert_runs["fsdp"]
    cut = tmp_path / "cut"
    argv = _bert_argv(distill_setup, cut, "--checkpoint_interval", "2", "--fsdp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "causal_train.py"]
    # 1. kill -9 to torchrun and its ranks as soon as checkpoint-2 is written
    proc = subprocess.Popen(cmd + argv, cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 200
    for line in proc.stdout:
        if "checkpoint written: " in line and line.rstrip().endswith(("checkpoint-2 (2 ranks)",)) \
                or time.time() > deadline:
            break
    signal_tree(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert (cut / "checkpoint-2").exists(), "the run ended before the kill"
    assert not (cut / "model.safetensors").exists() and not (cut / f"checkpoint-{BERT_STEPS}").exists()
    # 2. --resume, then SIGTERM to torchrun's process group after a step (torchrun passes it on to the ranks)
    proc = subprocess.Popen(cmd + argv + ["--resume"], cwd=ROOT, env=SUBPROCESS_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if re.search(r"step \d+ \|", line) or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=200)
    log = "".join(log) + rest
    assert "resumed from" in log and "received SIGTERM" in log, log[-4000:]
    assert log.count("stopped by signal 15; resume with the same command plus --resume") == 2, log[-4000:]
    assert not (cut / "model.safetensors").exists()
    # 3. --resume to the end: the weights of the run that never stopped, bitwise
    out = torchrun(argv + ["--resume"])
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert_same_weights(student_weights(cut), student_weights(full))


def consolidate_cli(monkeypatch, *argv) -> int:
    """scripts/consolidate_checkpoint.py as a user runs it, in this process (runpy: its `__main__` path, argv
    included, without an interpreter's start-up); its exit status (0, or what `run_cli` exits with)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["scripts/consolidate_checkpoint.py", *argv])
    try:
        runpy.run_path(str(ROOT / "scripts" / "consolidate_checkpoint.py"), run_name="__main__")
    except SystemExit as stop:
        return stop.code
    return 0


@pytest.mark.e2e
def test_sharded_checkpoint_consolidates_to_an_equal_hf_folder_and_is_verified(bert_runs, tmp_path, monkeypatch,
                                                                               caplog):
    import logging

    from transformers import AutoModelForMaskedLM

    import checkpoints

    full, _ = bert_runs["fsdp"]
    ckpt = full / f"checkpoint-{BERT_STEPS}"
    out = tmp_path / "student"
    assert consolidate_cli(monkeypatch, "--checkpoint", str(ckpt), "--out", str(out)) == 0
    assert_same_weights(student_weights(out), student_weights(full))  # the last checkpoint is the final student
    reloaded = AutoModelForMaskedLM.from_pretrained(out).state_dict()
    assert_same_weights({k: reloaded[k] for k in student_weights(out)}, student_weights(full))
    # a truncated shard is named by the manifest check, and neither resumed from nor consolidated
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    shard = damaged / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert "__1_0.distcp has" in checkpoints.checkpoint_problem(damaged)
    assert checkpoints.checkpoint_problem(ckpt) is None
    caplog.set_level(logging.INFO)
    assert consolidate_cli(monkeypatch, "--checkpoint", str(damaged), "--out", str(tmp_path / "x")) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "__1_0.distcp has" in errors[0], errors
    assert not (tmp_path / "x").exists()
    # a shard the manifest does not list is not vouched for
    shard.write_bytes((ckpt / "__1_0.distcp").read_bytes())
    manifest = json.loads((damaged / "manifest.json").read_text())
    del manifest["files"]["__1_0.distcp"]
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    assert "manifest.json does not list __1_0.distcp" in checkpoints.checkpoint_problem(damaged)
    # a checkpoint whose write was interrupted before its manifest is not a checkpoint to resume from
    (damaged / "manifest.json").unlink()
    assert "manifest.json is missing" in checkpoints.checkpoint_problem(damaged)


@pytest.mark.e2e
def test_sharded_checkpoints_are_refused_by_another_engine_or_rank_count_and_one_rank_trains_bf16_offloaded(
        bert_runs, distill_setup, tmp_path, monkeypatch):
    fsdp, _ = bert_runs["fsdp"]
    ddp, _ = bert_runs["ddp"]
    # one process without --fsdp
    copy = tmp_path / "fsdp_copy"
    shutil.copytree(fsdp, copy)
    with pytest.raises(CliError, match="written by an --fsdp run .*with --fsdp under torchrun"):
        causal_train.main(_bert_argv(distill_setup, copy, "--resume"))
    # one rank of torchrun (its environment, in this process) with --fsdp: the 2-rank checkpoint, then DDP's
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    try:
        with pytest.raises(CliError, match="written by 2 processes; resume with the same number .now 1."):
            causal_train.main(_bert_argv(distill_setup, copy, "--resume", "--fsdp"))
        with pytest.raises(CliError, match="written without --fsdp: resume it without --fsdp"):
            causal_train.main(_bert_argv(distill_setup, tmp_path / "new", "--fsdp", "--resume_from",
                                         str(ddp / f"checkpoint-{BERT_STEPS}")))
        # one rank is a process group too: --fsdp trains (the teacher sharded: torch's one-rank gather refuses
        # inference tensors, so a sharded teacher runs under no_grad), here with the bf16 policy, the CPU offload
        # of the student and frozen position embeddings
        dump = tmp_path / "one"
        causal_train.main(train_argv(distill_setup, dump, "--max_steps", "2", "--fsdp", "--fsdp_teacher",
                                     "--fsdp_cpu_offload", "--bf16", "--freeze_pos_embs"))
        weights = student_weights(dump)
        assert {w.dtype for w in weights.values()} == {torch.float32}  # fp32 master weights, saved as such
        assert all(bool(torch.isfinite(w).all()) for w in weights.values())
        initial = torch.load(distill_setup["student_weights"], weights_only=True)
        frozen = "distilbert.embeddings.position_embeddings.weight"
        trained = "distilbert.transformer.layer.0.ffn.lin1.weight"
        assert torch.equal(weights[frozen], initial[frozen]) and not torch.equal(weights[trained], initial[trained])
    finally:  # (a process exits after such an error; this one goes on testing)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.e2e
def test_every_family_sharded_gives_the_unsharded_losses_and_gradients():
    out = torchrun([], script="tests/fsdp_families_check.py")
    assert out.returncode == 0, out.stdout + out.stderr[-6000:]  # the families checked, then why a rank stopped
    from interventions import FAMILIES

    assert {line.split()[1] for line in out.stdout.splitlines() if line.startswith("OK ")} == set(FAMILIES)


# --- fast checks -------------------------------------------------------------------------------------------
def test_fsdp_flags_are_clear_errors(distill_setup, tmp_path, monkeypatch):
    """(The command line's exit status 2, one message and no traceback: tests/test_bad_inputs.py's train-fsdp-* rows.)"""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "1")
    for extra, message in ((["--fsdp"], "--fsdp shards the models across the processes of torchrun"),
                           (["--fsdp_teacher"], "--fsdp_teacher needs --fsdp"),
                           (["--fsdp_cpu_offload"], "--fsdp_cpu_offload needs --fsdp")):
        with pytest.raises(CliError, match=re.escape(message)):
            causal_train.main(argv + extra)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(CliError, match="--fp16 cannot be combined with --fsdp"):
        causal_train.main(argv + ["--fsdp", "--fp16"])
    assert not (tmp_path / "run").exists()


def test_mixed_precision_policy_of_bf16():
    from argparse import Namespace

    from sharding import policies

    params = Namespace(bf16=True, fsdp_cpu_offload=True, device=torch.device("cpu"))
    mp, offload = policies(params, trainable=True)
    assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert type(offload).__name__ == "CPUOffloadPolicy" and not offload.pin_memory
    mp, offload = policies(params, trainable=False)  # the frozen teacher: as loaded, never offloaded
    assert mp.param_dtype is None and type(offload).__name__ == "OffloadPolicy"


def test_dcp_metadata_is_read_without_unrestricted_unpickling(tmp_path):
    """DCP's own reader unpickles `.metadata` unrestricted; ours admits only DCP's metadata classes."""
    from torch.distributed.checkpoint.metadata import Metadata

    import sharded_checkpoints

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={}, planner_data=Evil())))
    with pytest.raises(pickle.UnpicklingError, match="refers to (posix|os|nt).system"):
        sharded_checkpoints.safe_metadata_reader(tmp_path).read_metadata()
    assert not (tmp_path / "pwned").exists()
    (tmp_path / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={})))
    assert sharded_checkpoints.safe_metadata_reader(tmp_path).read_metadata().state_dict_metadata == {}


def test_training_state_of_a_sharded_checkpoint_loads_weights_only(tmp_path):
    import random

    import numpy as np

    import checkpoints
    import sharded_checkpoints

    state = {"rng": [checkpoints.rng_state()], "pairing": np.arange(5)}
    checkpoints.save_training_state(sharded_checkpoints.portable_state(state), tmp_path / "s.pt")
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)
    assert torch.equal(loaded["pairing"], torch.arange(5))
    checkpoints.set_rng_state(sharded_checkpoints.native_rng(loaded["rng"][0]))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws


# --- a crafted sharded checkpoint runs no code ----------------------------------------------------------------
@pytest.fixture
def one_rank_group(monkeypatch):
    """A gloo process group of one rank in this process (what DCP's collectives need), destroyed afterwards."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    torch.distributed.init_process_group("gloo")
    yield
    torch.distributed.destroy_process_group()


def _sharded_run(tmp_path):
    """A real sharded checkpoint of a tiny DistilBERT and its AdamW (one step taken), written by
    `write_sharded_checkpoint` on one rank; returns (checkpoint folder, a fresh student, its optimizer)."""
    from helpers import tiny_distilbert

    from checkpoints import CheckpointWriter, rng_states_all_ranks
    from sharded_checkpoints import write_sharded_checkpoint

    def model_and_optimizer():
        student = tiny_distilbert()
        optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
        student(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss.backward()
        optimizer.step()
        return student, optimizer

    student, optimizer = model_and_optimizer()
    state = {"scheduler": {}, "scaler": {}, "epoch": 0, "n_step": 1, "batch_in_epoch": 1, "n_tokens": 3,
             "n_skipped_nonfinite": 0, "pairing": None, "world_size": 1, "data_fingerprint": None,
             "rng": rng_states_all_ranks(False)}
    folder = write_sharded_checkpoint(CheckpointWriter(tmp_path / "run"), 1, student, optimizer, state, True)
    return folder, *model_and_optimizer()



def _craft_bytes_entry(folder, key: str, marker) -> None:
    """What the attack did: one tensor entry of `.metadata` replaced by a BytesStorageMetadata that points at a
    torch.save'd object whose unpickling runs a command, appended to a shard; the manifest sealed again."""
    import io

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from checkpoints import write_manifest

    metadata = pickle.loads((folder / ".metadata").read_bytes())
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    shard = folder / "__0_0.distcp"
    offset = shard.stat().st_size
    shard.write_bytes(shard.read_bytes() + buffer.getvalue())
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("__0_0.distcp", offset, len(buffer.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    write_manifest(folder)


KEY = "model.distilbert.embeddings.word_embeddings.weight"


def test_a_sharded_checkpoint_reloads_and_consolidates(one_rank_group, tmp_path):
    from types import SimpleNamespace

    from sharded_checkpoints import consolidate, read_sharded_checkpoint

    folder, student, optimizer = _sharded_run(tmp_path)
    params = SimpleNamespace(world_size=1, data_file=str(tmp_path / "unused"), data_fingerprint=None)
    assert read_sharded_checkpoint(folder, student, optimizer, params)["n_step"] == 1
    consolidate(folder, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.mark.parametrize("path", ["consolidate", "resume"])
def test_a_bytes_entry_in_sharded_metadata_is_refused_unread(one_rank_group, tmp_path, path):
    from types import SimpleNamespace

    from sharded_checkpoints import consolidate, read_sharded_checkpoint

    folder, student, optimizer = _sharded_run(tmp_path)
    marker = tmp_path / "pwned"
    _craft_bytes_entry(folder, KEY, marker)
    with pytest.raises(CliError, match=r"checkpoint .*checkpoint-1: its \.metadata is refused .*BytesStorageMetadata"):
        if path == "consolidate":
            consolidate(folder, tmp_path / "hf")
        else:
            params = SimpleNamespace(world_size=1, data_file=str(tmp_path / "unused"), data_fingerprint=None)
            read_sharded_checkpoint(folder, student, optimizer, params)
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_sharded_metadata_must_describe_the_tensors_this_student_expects(one_rank_group, tmp_path):
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from checkpoints import write_manifest
    from sharded_checkpoints import _METADATA_CLASSES, check_metadata, consolidate

    folder, student, _ = _sharded_run(tmp_path)
    metadata = pickle.loads((folder / ".metadata").read_bytes())
    metadata.state_dict_metadata[KEY].size = torch.Size([7, 7])
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    write_manifest(folder)  # sealed again, as the attack did: the manifest alone cannot tell
    with pytest.raises(CliError, match=rf"does not fit this student: {re.escape(KEY)} is \(7, 7\) torch.float32 there"):
        consolidate(folder, tmp_path / "hf")
    del metadata.state_dict_metadata[KEY]
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CliError, match=f"holds no {re.escape(KEY)}"):
        check_metadata(folder, {"model": student.state_dict()})
    # were BytesStorageMetadata admitted by the unpickler, the entry would still be refused as not a tensor
    metadata.state_dict_metadata[KEY] = BytesStorageMetadata()
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    _METADATA_CLASSES["torch.distributed.checkpoint.metadata"].add("BytesStorageMetadata")
    try:
        with pytest.raises(CliError, match="lists entries that are not tensors"):
            check_metadata(folder, {"model": student.state_dict()})
    finally:
        _METADATA_CLASSES["torch.distributed.checkpoint.metadata"].discard("BytesStorageMetadata")
