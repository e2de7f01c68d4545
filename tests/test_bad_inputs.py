"""Every script, called as a user calls it (`python script.py ...`), on bad input: exit status 2, one error
message naming the culprit, no traceback, nothing written.

The scripts run in this process through runpy (the `if __name__ == "__main__"` path, argv included),
which is what a subprocess would run, without paying each interpreter's start-up.
"""
import json
import logging
import runpy
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import train_argv


@pytest.fixture(scope="module")
def world(tmp_path_factory, distill_setup, corpus_lines):
    root = tmp_path_factory.mktemp("bad")
    setup = distill_setup
    w = dict(setup)
    w["a_file"] = root / "a_file.txt"
    w["a_file"].write_text("not a folder\n")
    w["text"] = root / "text.txt"
    w["text"].write_text("\n".join(corpus_lines[:20]) + "\n")
    # a model folder whose weights file was cut short (a copy interrupted, a full disk)
    import shutil

    truncated = root / "truncated_teacher"
    shutil.copytree(setup["teacher"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    w["truncated"] = truncated
    from transformers import BertModel

    w["headless"] = root / "headless"
    BertModel.from_pretrained(setup["teacher"]).save_pretrained(w["headless"])
    cfg = json.loads(Path(setup["student_config"]).read_text())
    cfg["n_heads"] = 5  # does not divide dim 32
    w["bad_heads"] = root / "bad_heads.json"
    w["bad_heads"].write_text(json.dumps(cfg))
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'pwned'}",))

    w["crafted_counts"] = root / "crafted.pickle"
    w["crafted_counts"].write_bytes(pickle.dumps([1, Payload()]))
    w["png"] = root / "dev.json"
    w["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    w["glue"] = root / "eval_results.json"
    w["glue"].write_text(json.dumps({"eval_accuracy": "high"}))
    w["root"] = root
    return w


def _train(w, out, *extra):
    return train_argv(w, out / "run", "--max_steps", "2", *extra)


# (id, script, argv builder(world, out), message that must appear)
CASES = [
    ("train-missing-data", "causal_train.py", lambda w, o: _train(w, o, "--data_file", str(o / "typo.bin")),
     "--data_file .*typo.bin: binarized corpus not found"),
    ("train-dump-under-file", "causal_train.py", lambda w, o: train_argv(w, w["a_file"] / "run"),
     "--dump_path .*a_file.txt/run: .*a_file.txt is a file, not a folder"),
    ("train-n_epoch-0", "causal_train.py", lambda w, o: _train(w, o, "--n_epoch", "0"), "--n_epoch must be >= 1, not 0"),
    ("train-n_epoch--1", "causal_train.py", lambda w, o: _train(w, o, "--n_epoch", "-1"), "--n_epoch must be >= 1"),
    ("train-max_steps-0", "causal_train.py", lambda w, o: _train(w, o, "--max_steps", "0"), "--max_steps must be -1"),
    ("train-warmup", "causal_train.py", lambda w, o: _train(w, o, "--warmup_prop", "-1"), "--warmup_prop must be in"),
    ("train-log_interval", "causal_train.py", lambda w, o: _train(w, o, "--log_interval", "0"),
     "--log_interval must be >= 1"),
    ("train-lr", "causal_train.py", lambda w, o: _train(w, o, "--learning_rate", "-1"), "--learning_rate must be > 0"),
    ("train-input-size-0", "causal_train.py", lambda w, o: _train(w, o, "--max_model_input_size", "0"),
     "--max_model_input_size must be >= 3"),
    ("train-input-size-big", "causal_train.py", lambda w, o: _train(w, o, "--max_model_input_size", "4096"),
     "--max_model_input_size 4096 is beyond the models' positions"),
    ("train-workers", "causal_train.py", lambda w, o: _train(w, o, "--num_workers", "-1"), "--num_workers must be >= 0"),
    ("train-seed", "causal_train.py", lambda w, o: _train(w, o, "--seed", "-1"), "--seed must be in"),
    ("train-crafted-counts", "causal_train.py", lambda w, o: _train(w, o, "--token_counts", str(w["crafted_counts"])),
     "crafted.pickle: not a token counts file .*refusing to load posix.system"),
    ("train-truncated-teacher", "causal_train.py", lambda w, o: _train(w, o, "--teacher_name", str(w["truncated"]),
                                                                     "--tokenizer_name", str(w["teacher"])),
     "--teacher_name .*truncated_teacher: cannot load a bert teacher"),
    ("train-truncated-student", "causal_train.py",
     lambda w, o: _train(w, o, "--student_pretrained_weights", str(w["truncated"])),
     "--student_pretrained_weights .*truncated_teacher/model.safetensors: cannot read the weights"),
    ("train-heads", "causal_train.py", lambda w, o: _train(w, o, "--student_config", str(w["bad_heads"]),
                                                           "--student_pretrained_weights", str(w["student_weights"])),
     "--student_config .*bad_heads.json: cannot build a distilbert from it"),
    ("train-headless-teacher", "causal_train.py", lambda w, o: _train(w, o, "--teacher_name", str(w["headless"]),
                                                                     "--tokenizer_name", str(w["teacher"])),
     "headless lacks weights of BertForMaskedLM"),
    ("train-resume-nothing", "causal_train.py", lambda w, o: _train(w, o, "--resume"),
     "--resume: .*run does not exist"),
    ("binarize-max-parsing", "scripts/binarized_data.py",
     lambda w, o: ["--file_path", str(w["text"]), "--tokenizer_type", "bert", "--tokenizer_name", str(w["teacher"]),
                   "--dump_file", str(o / "data"), "--max_parsing_example", "-5"],
     "--max_parsing_example must be -1"),
    ("binarize-under-file", "scripts/binarized_data.py",
     lambda w, o: ["--file_path", str(w["text"]), "--tokenizer_type", "bert", "--tokenizer_name", str(w["teacher"]),
                   "--dump_file", str(w["a_file"] / "data")],
     "--dump_file .*a_file.txt is a file, not a folder"),
    ("counts-dump-folder", "scripts/token_counts.py",
     lambda w, o: ["--data_file", str(w["data"]), "--token_counts_dump", str(w["root"])],
     "--token_counts_dump .* is a folder; give a file name"),
    ("counts-dump-under-file", "scripts/token_counts.py",
     lambda w, o: ["--data_file", str(w["data"]), "--token_counts_dump", str(w["a_file"] / "c.pickle")],
     "a_file.txt is a file, not a folder"),
    ("mlm-batch-0", "run_mlm.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["text"]), "--do_eval",
                   "--output_dir", str(o / "mlm"), "--per_device_train_batch_size", "0"],
     "--per_device_train_batch_size must be >= 1, not 0"),
    ("mlm-truncated-model", "run_mlm.py",
     lambda w, o: ["--model_name_or_path", str(w["truncated"]), "--tokenizer_name", str(w["teacher"]),
                   "--validation_file", str(w["text"]), "--do_eval", "--output_dir", str(o / "mlm")],
     "could not load model weights from --model_name_or_path .*truncated_teacher .*SafetensorError"),
    ("qa-png", "run_qa.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["png"]), "--do_eval",
                   "--output_dir", str(o / "qa")],
     "dev.json is not SQuAD json"),
    ("glue-table-text-metric", "scripts/glue_table.py", lambda w, o: ["--result", f"m:sst2={w['glue']}"],
     "eval_accuracy is 'high', not a number"),
]


def _snapshot(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("script, build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_message_exit_2_and_writes_nothing(world, tmp_path, monkeypatch, caplog, capsys,
                                                                 script, build, message):
    out = tmp_path / "out"
    argv = build(world, out)
    before = _snapshot(world["root"])
    monkeypatch.setattr(sys, "argv", [script, *argv])
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as stop:  # anything else would be a traceback for the user
        runpy.run_path(str(ROOT / script), run_name="__main__")
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert stop.value.code == 2, errors
    assert len(errors) == 1, errors
    import re

    assert re.search(message, errors[0]), errors[0]
    assert "Traceback" not in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    assert _snapshot(world["root"]) == before
    assert not (world["root"] / "pwned").exists()
