"""causal_train.py end to end on tiny local models: training lowers the loss, the saved student
reloads equal, standard KD runs no causal forwards, and every pre-training check gives its error."""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import checkpointed_argv, student_weights, train_argv, two_epoch_argv

import causal_distiller
import causal_train
import checkpoints
from binarized_io import HEADER_SIZE, CorpusWriter, load_corpus
from checkpoints import load_training_state
from utils import CliError


def _losses_from_log(caplog):
    out = []
    for rec in caplog.records:
        msg = rec.getMessage()
        if msg.startswith("step ") and "| loss " not in msg and " loss " in msg:
            parts = msg.split("|")[1].split()
            out.append(dict(zip(parts[::2], map(float, parts[1::2]))))
    return out


def test_diito_run_lowers_loss_and_saves_a_reloadable_student(distill_setup, tmp_path, caplog):
    from transformers import AutoModelForMaskedLM

    dump = tmp_path / "run"
    caplog.set_level("INFO")
    causal_train.main(train_argv(distill_setup, dump, "--max_steps", "30", "--interchange_consecutive_only",
                                 "--learning_rate", "5e-3", "--checkpoint_interval", "10", "--mlm_smoothing", "0"))
    logged = _losses_from_log(caplog)
    assert len(logged) >= 5
    assert set(logged[0]) >= {"ce", "mlm", "cos", "causal_ce", "causal_cos", "loss"}
    assert all(math.isfinite(v) for row in logged for v in row.values())
    assert logged[-1]["loss"] < logged[0]["loss"] * 0.93
    # plain HF folder that AutoModelForMaskedLM loads, with identical outputs
    reloaded = AutoModelForMaskedLM.from_pretrained(dump).eval()
    assert type(reloaded).__name__ == "DistilBertForMaskedLM"
    ckpts = sorted(p.name for p in dump.glob("checkpoint-*"))
    assert ckpts, "an epoch-end or final checkpoint is written"
    params = json.loads((dump / "parameters.json").read_text())
    assert params["alpha_causal_ce"] == 0.5 and "git" in params
    assert list((dump / "log" / "train").glob("events.*"))
    from safetensors.torch import load_file

    saved = load_file(str(dump / "model.safetensors"))
    for k, v in reloaded.state_dict().items():
        if k in saved:
            torch.testing.assert_close(v, saved[k])
    ids = torch.randint(5, 100, (2, 9))
    with torch.no_grad():
        a = reloaded(input_ids=ids).logits
        b = AutoModelForMaskedLM.from_pretrained(dump).eval()(input_ids=ids).logits
    torch.testing.assert_close(a, b)


def _forward_counts(monkeypatch, argv) -> dict:
    """Run causal_train.main(argv) and return the distiller's count of forward runs per model."""
    from causal_distiller import CausalDistiller

    seen = {}
    original = CausalDistiller.train

    def spy(self):
        original(self)
        seen.update(self.forward_counts)

    monkeypatch.setattr(CausalDistiller, "train", spy)
    causal_train.main(argv)
    return seen


def test_standard_kd_runs_no_source_or_counterfactual_forward(distill_setup, tmp_path, monkeypatch):
    seen = _forward_counts(monkeypatch, train_argv(distill_setup, tmp_path / "kd", "--max_steps", "3", causal=False))
    assert seen["teacher"] == {"base": 3} and seen["student"] == {"base": 3}


def test_diito_counts_three_runs_per_model(distill_setup, tmp_path, monkeypatch):
    seen = _forward_counts(monkeypatch, train_argv(distill_setup, tmp_path / "diito", "--max_steps", "2", "--include_crossway"))
    # crossway: two pairs per step, each with base, source and counterfactual runs
    assert seen["student"] == {"base": 4, "source": 4, "counterfactual": 4} == seen["teacher"]


def _expect_error(argv, fragment):
    with pytest.raises(CliError) as err:
        causal_train.main(argv)
    assert fragment in str(err.value), str(err.value)


def test_checks_before_training(distill_setup, tmp_path, monkeypatch):
    import pickle

    from transformers import DistilBertConfig

    # dump path exists without --force
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "f").write_text("x")
    _expect_error(train_argv(distill_setup, tmp_path / "exists"), "--force")
    # vocabulary sizes differ
    cfg = DistilBertConfig.from_json_file(distill_setup["student_config"])
    cfg.vocab_size += 7
    cfg.to_json_file(tmp_path / "bigvocab.json")
    argv = train_argv(distill_setup, tmp_path / "a")
    i = argv.index("--student_pretrained_weights")
    del argv[i:i + 2]  # a student built at random from the config
    i = argv.index("--student_config")
    argv[i + 1] = str(tmp_path / "bigvocab.json")
    _expect_error(argv, "vocabulary sizes differ")
    # hidden sizes differ with cos on
    cfg = DistilBertConfig.from_json_file(distill_setup["student_config"])
    cfg.dim, cfg.hidden_dim = 16, 32
    cfg.to_json_file(tmp_path / "narrow.json")
    argv[i + 1] = str(tmp_path / "narrow.json")
    _expect_error(argv, "equal hidden sizes")
    # token counts of the wrong length
    with open(tmp_path / "counts.pickle", "wb") as fh:
        pickle.dump([1, 2, 3], fh)
    _expect_error(train_argv(distill_setup, tmp_path / "b", "--token_counts", str(tmp_path / "counts.pickle")),
                  "has 3 entries")
    # student weights of another depth than the config
    cfg = DistilBertConfig.from_json_file(distill_setup["student_config"])
    cfg.n_layers = 3
    cfg.to_json_file(tmp_path / "deeper.json")
    _expect_error(train_argv(distill_setup, tmp_path / "c", "--student_config", str(tmp_path / "deeper.json")),
                  "does not match --student_config")
    # malformed mapping
    (tmp_path / "bad.nm").write_text('{"interchange_variable_mappings": [{"teacher_variable_names": ["$L:9$H:0$[0:1]"], '
                                     '"student_variable_names": ["$L:0$H:0$[0:1]"]}]}')
    _expect_error(train_argv(distill_setup, tmp_path / "d", "--neuron_mapping", str(tmp_path / "bad.nm")), "layer 9")
    # missing data file
    _expect_error(train_argv(distill_setup, tmp_path / "e", "--data_file", str(tmp_path / "nope.bin")), "nope.bin")
    # causal weight without a mapping
    argv = train_argv(distill_setup, tmp_path / "f", causal=False) + ["--alpha_causal_ce", "0.5"]
    _expect_error(argv, "--neuron_mapping")
    # --compile on a CPU machine without a C++ compiler
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    _expect_error(train_argv(distill_setup, tmp_path / "h", "--compile"), "C++ compiler")


def test_cli_error_exits_nonzero_without_traceback(distill_setup, tmp_path):
    argv = train_argv(distill_setup, tmp_path / "g", "--teacher_name", str(tmp_path / "no_teacher"))
    out = subprocess.run([sys.executable, "causal_train.py", *argv], capture_output=True, text=True,
                         cwd=causal_train.__file__.rsplit("/", 1)[0])
    assert out.returncode == 2
    assert "no_teacher" in out.stderr and "Traceback" not in out.stderr


def test_data_augment_swaps_tokens_without_a_source_run(distill_setup, tmp_path, monkeypatch):
    seen = _forward_counts(monkeypatch, train_argv(distill_setup, tmp_path / "aug", "--max_steps", "2", "--data_augment"))
    assert seen["student"] == {"base": 2, "counterfactual": 2} == seen["teacher"]


def test_masked_token_only_interchange_trains(distill_setup, tmp_path, monkeypatch):
    seen = _forward_counts(monkeypatch, train_argv(distill_setup, tmp_path / "masked", "--max_steps", "2",
                                                   "--interchange_masked_token_only", "--restrict_ce_to_mask"))
    assert seen["student"] == {"base": 2, "source": 2, "counterfactual": 2}


def test_the_first_step_of_a_run_is_build_then_step(distill_setup, tmp_path):
    """causal_train.main trains what distill_setup.build builds, one CausalDistiller.step per optimiser step:
    build + one step on the first window gives the weights of a one-step run, bitwise."""
    from itertools import islice

    from helpers import student_weights

    from distill_setup import build, build_parser, sanity_checks, start_runtime

    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "1", "--gradient_accumulation_steps", "2",
                      "--freeze_pos_embs", "--include_crossway")
    causal_train.main(argv)

    args = build_parser().parse_args(argv)
    sanity_checks(args)
    run = build(args, start_runtime(args))
    assert not run.student.distilbert.embeddings.position_embeddings.weight.requires_grad
    assert not any(p.requires_grad for p in run.teacher.parameters()) and not run.teacher.training
    run.student.train()
    run.dataset.set_epoch(0)
    window = list(islice(run.distiller.collated(run.distiller.epoch_batches(0)), 2))
    losses = run.distiller.step(window)
    assert run.distiller.n_step == 1 and len(run.optimizer.state) > 0
    assert set(losses) == {"ce", "mlm", "cos", "causal_ce", "causal_cos", "loss"}
    saved = student_weights(tmp_path / "run")
    for name, value in run.student.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name


def test_count_step_flops_counts_the_runs_own_steps(distill_setup, tmp_path):
    """scripts/count_step_flops.py builds the run of its causal_train.py arguments and counts its first steps."""
    import count_step_flops

    diito = count_step_flops.count(train_argv(distill_setup, tmp_path / "unused", "--freeze_pos_embs"), 2)
    standard = count_step_flops.count(train_argv(distill_setup, tmp_path / "unused", causal=False), 2)
    assert diito["steps_counted"] == standard["steps_counted"] == 2
    assert diito["real_tokens"] == standard["real_tokens"] > 0  # the same first batches
    assert all(s < d for s, d in zip(standard["flops_each"], diito["flops_each"]))
    assert diito == count_step_flops.count(train_argv(distill_setup, tmp_path / "unused", "--freeze_pos_embs"), 2)
    assert not (tmp_path / "unused").exists()  # nothing written


def test_a_finished_run_leaves_nothing_alive_and_its_signal_handlers_restored(distill_setup, tmp_path):
    """The stop handler refers to the training loop; left installed after a run, it kept the models, DDP's reducer
    and the process group alive until the interpreter's exit, where a torchrun rank now and then aborted in their
    destructors ("terminate called without an active exception", exit -6) after saving its student."""
    import gc
    import signal

    import causal_distiller

    def alive() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, causal_distiller.CausalDistiller)}

    before, handlers = alive(), {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    causal_train.main(train_argv(distill_setup, tmp_path / "run", "--max_steps", "2"))
    assert alive() <= before  # (earlier tests of this process may hold distillers of their own)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers


def test_causal_train_checks_the_recorded_checksum_at_start(distill_setup, tmp_path):
    data = tmp_path / "data.bin"
    shutil.copy(distill_setup["data"], data)
    corpus = load_corpus(data)
    pos = HEADER_SIZE + 2 * int(corpus.starts[0] + 3)  # a token inside the first sequence (uint16)
    with open(data, "r+b") as fh:
        fh.seek(pos)
        fh.write(b"\x07\x00")
    with pytest.raises(CliError, match="data.bin: the tokens differ from the checksum"):
        causal_train.main(checkpointed_argv(distill_setup, tmp_path / "r", 4, "--data_file", str(data)))


def test_teacher_without_its_lm_head_is_an_error(distill_setup, tmp_path):
    from transformers import BertModel

    headless = tmp_path / "headless"
    BertModel.from_pretrained(distill_setup["teacher"]).save_pretrained(headless)
    with pytest.raises(CliError, match=r"headless lacks weights of BertForMaskedLM .*cls\.predictions"):
        causal_train.main(checkpointed_argv(distill_setup, tmp_path / "r", 4, "--teacher_name", str(headless),
                                "--tokenizer_name", str(distill_setup["teacher"])))


def test_corpus_of_another_tokenizer_is_an_error_unless_allowed(distill_setup, tmp_path, caplog):
    data = tmp_path / "other.bin"
    corpus = load_corpus(distill_setup["data"])
    with CorpusWriter(data, vocab_size=corpus.vocab_size, vocab_hash="0123456789abcdef", shuffle=False) as w:
        for seq in corpus:
            w.add(seq)
    argv = checkpointed_argv(distill_setup, tmp_path / "r", 4, "--data_file", str(data), "--max_steps", "1")
    with pytest.raises(CliError, match="other.bin was binarized with another tokenizer .*vocabulary fingerprint "
                                       "0123456789abcdef vs .*--allow_tokenizer_mismatch"):
        causal_train.main(argv)
    causal_train.main(argv + ["--allow_tokenizer_mismatch"])
    assert "going on (--allow_tokenizer_mismatch)" in caplog.text


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
    argv = two_epoch_argv(distill_setup, dump)
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
    causal_train.main(two_epoch_argv(distill_setup, dump, "--skip_nonfinite_steps", "1", "--max_steps", "5"))
    assert "step skipped (1/1 skips used)" in caplog.text
    assert all(torch.isfinite(w).all() for w in student_weights(dump).values())


def test_data_file_changed_under_the_run_is_detected(distill_setup, tmp_path):
    import shutil

    data = tmp_path / "data.bin"
    shutil.copy(distill_setup["data"], data)
    dump = tmp_path / "changed"
    argv = two_epoch_argv(distill_setup, dump, "--data_file", str(data), "--max_steps", "2")
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
        causal_train.main(two_epoch_argv(distill_setup, tmp_path / "t", "--data_file", str(data)))


def test_out_of_memory_names_the_batch(distill_setup, tmp_path, monkeypatch):
    def oom(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(causal_distiller.CausalDistiller, "losses_for_batch", oom)
    with pytest.raises(CliError, match=r"out of memory at step 1 on a batch of shape \(16, \d+\).*--batch_size"):
        causal_train.main(two_epoch_argv(distill_setup, tmp_path / "oom"))


def test_a_short_run_logs_about_fifty_points_by_default(distill_setup, tmp_path, caplog):
    """--log_interval 500 by default gave one point (the final one) in a short run."""
    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "6")
    i = argv.index("--log_interval")
    del argv[i:i + 2]
    caplog.set_level(logging.INFO)
    causal_train.main(argv)
    steps = [r.getMessage().split(" |")[0] for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps == [f"step {n}" for n in range(1, 7)]
    assert "logging every 1" in caplog.text


def test_causal_train_blames_the_tokenizer_not_the_corpus(tmp_path, distill_setup, model_without_tokenizer):
    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "1")
    argv[argv.index("--teacher_name") + 1] = str(model_without_tokenizer)
    with pytest.raises(CliError, match="--tokenizer_name") as err:
        causal_train.main(argv)
    assert "corpus" not in str(err.value) and "binarized" not in str(err.value)


def test_snapshots_are_the_student_at_their_steps(distill_setup, tmp_path):
    """--snapshot_interval: plain model folders equal to the checkpoint's student at the same step and to the final
    student at the last, without changing the run."""
    from helpers import assert_same_weights

    from transformers import AutoModelForMaskedLM

    dump, plain = tmp_path / "snap", tmp_path / "plain"
    causal_train.main(checkpointed_argv(distill_setup, dump, 4, "--snapshot_interval", "2"))
    causal_train.main(checkpointed_argv(distill_setup, plain, 4))
    assert sorted(p.name for p in (dump / "snapshots").iterdir()) == ["step_2", "step_4"]
    ckpt = {c.name: c for c in checkpoints.list_checkpoints(dump)}
    assert_same_weights(student_weights(dump / "snapshots" / "step_2"), student_weights(ckpt["checkpoint-2"]))
    assert_same_weights(student_weights(dump / "snapshots" / "step_4"), student_weights(dump))
    assert_same_weights(student_weights(dump), student_weights(plain))
    assert AutoModelForMaskedLM.from_pretrained(dump / "snapshots" / "step_2") is not None
