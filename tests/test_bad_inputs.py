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
def world(tmp_path_factory, distill_setup, corpus_lines):  # noqa: C901 -- one place that makes every bad input
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
    import pickle

    from helpers import Payload

    w["crafted_counts"] = root / "crafted.pickle"
    w["crafted_counts"].write_bytes(pickle.dumps([1, Payload(root / "pwned")]))
    w["png"] = root / "dev.json"
    w["png"].write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    w["glue"] = root / "eval_results.json"
    w["glue"].write_text(json.dumps({"eval_accuracy": "high"}))
    (root / "percent").mkdir()
    w["glue_percent"] = root / "percent" / "eval_results.json"
    w["glue_percent"].write_text(json.dumps({"eval_accuracy": 85.3}))
    _issue21_inputs(w, root, setup, corpus_lines, lambda: Payload(root / "pwned"))
    w["sharded_checkpoint"] = _sharded_checkpoint(root, setup)
    w["root"] = root
    w["ro"] = read_only_folder(root / "read_only")
    yield w
    release_read_only(w["ro"])


def read_only_folder(path):
    """A folder nothing can be created in, for this user too: mode 555, and immutable (chattr +i) for root, whom
    modes do not stop. None where neither holds (the read-only rows are then skipped)."""
    import os
    import subprocess

    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
    try:
        (path / "probe").touch()
    except OSError:
        return path
    (path / "probe").unlink()
    release_read_only(path)
    return None


def release_read_only(path):
    import os
    import subprocess

    if path is not None:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False)
        path.chmod(0o755)


def _issue21_inputs(w, root, setup, corpus_lines, payload):
    """Issue 21's bad inputs: pickled corpora with ids out of range, damaged teachers, malformed task data."""
    import pickle
    import shutil

    import numpy as np
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(setup["teacher"])
    rng = np.random.default_rng(0)
    seqs = [np.r_[2, rng.integers(5, len(tok) - 1, 20), 3].astype(np.int32) for _ in range(30)]
    for name, value in (("negative", -4), ("beyond", 60000)):
        bad = [a.copy() for a in seqs]
        bad[5][3] = value
        w[f"pickle_{name}"] = root / f"ids_{name}.pickle"
        w[f"pickle_{name}"].write_bytes(pickle.dumps(bad))
    w["pickle_ok"] = root / "ids_ok.pickle"
    w["pickle_ok"].write_bytes(pickle.dumps(seqs))
    flipped = root / "flipped_teacher"  # a byte of the safetensors header flipped (a bad disk, a bad copy)
    shutil.copytree(setup["teacher"], flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[20] ^= 0x55
    (flipped / "model.safetensors").write_bytes(bytes(data))
    w["flipped"] = flipped
    w["crafted_pth"] = root / "crafted.pth"
    torch.save({"weight": payload()}, w["crafted_pth"])
    w["ner_string"] = root / "ner.json"
    w["ner_string"].write_text(json.dumps({"tokens": "EU rejects German call", "ner_tags": ["B-ORG", "O", "B-MISC", "O"]}))
    context = "The quick brown fox jumps over the lazy dog near the river bank."

    def squad(name, text, start):
        path = root / f"qa_{name}.json"
        path.write_text(json.dumps({"data": [{"id": "q1", "title": "t", "context": context, "question": "What jumps?",
                                              "answers": {"text": [text], "answer_start": [start]}}]}))
        return path

    w["qa_the"] = squad("the", "The", 0)
    w["qa_beyond"] = squad("beyond", "fox", 400)
    w["qa_elsewhere"] = squad("elsewhere", "cat", 16)
    w["qa_ok"] = squad("ok", "brown fox", 10)
    gpt2 = root / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    w["gpt2"] = gpt2
    nan_teacher = root / "nan_teacher"  # a hand-edited config.json: Python's json reads NaN
    shutil.copytree(setup["teacher"], nan_teacher)
    config = json.loads((nan_teacher / "config.json").read_text())
    config["hidden_dropout_prob"] = float("nan")
    (nan_teacher / "config.json").write_text(json.dumps(config))
    w["nan_teacher"] = nan_teacher
    student_config = json.loads(Path(setup["student_config"]).read_text())
    student_config["dropout"] = float("nan")
    w["nan_student"] = root / "nan_student.json"
    w["nan_student"].write_text(json.dumps(student_config))
    w["one_word"] = root / "one_word.txt"
    w["one_word"].write_text("word\n")
    w["empty_corpus"] = root / "empty.pickle"
    w["empty_corpus"].write_bytes(pickle.dumps([]))
    w["short_text"] = root / "short.txt"
    w["short_text"].write_text("a few words only\n")
    from binarized_io import CorpusWriter

    w["short_bin"] = root / "short.bin"  # every sequence shorter than the 12 tokens a training item needs
    with CorpusWriter(w["short_bin"], vocab_size=len(tok), tokenizer_name="tok", seed=0) as writer:
        for _ in range(3):
            writer.add([2, 7, 8, 9, 3])


def _extract(teacher, out):
    """extract_distilbert.py's arguments for a 2-block student of `teacher`, into `out`."""
    return ["--model_name", str(teacher), "--num_layers", "2", "--dump_checkpoint", str(out / "s.pth")]


def _iia_sweep(w, teacher, out, *extra):
    """run_iia.py's arguments: `teacher` against the world's teacher on its text, every block pair."""
    return ["--teacher_name", str(teacher), "--student_name", str(w["teacher"]), *extra, "--data_file",
            str(w["text"]), "--sweep", "--output_dir", str(out / "iia")]


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
] + [  # issue 21: each was a traceback or a silent result
    # an output folder that cannot be written, in every script that writes
    ("train-read-only", "causal_train.py", lambda w, o: train_argv(w, w["ro"] / "run"),
     "--dump_path .*read_only/run: .*read_only cannot be written"),
    ("mlm-read-only", "run_mlm.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["text"]), "--do_eval",
                   "--output_dir", str(w["ro"] / "mlm")], "--output_dir .*read_only/mlm: .*read_only cannot be written"),
    ("glue-read-only", "run_glue.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--task_name", "sst2", "--validation_file",
                   str(w["text"]), "--do_eval", "--output_dir", str(w["ro"] / "glue")],
     "--output_dir .*read_only/glue: .*read_only cannot be written"),
    ("iia-read-only", "run_iia.py",
     lambda w, o: ["--teacher_name", str(w["teacher"]), "--student_name", str(w["teacher"]), "--data_file",
                   str(w["text"]), "--sweep", "--output_dir", str(w["ro"] / "iia")],
     "--output_dir .*read_only/iia: .*read_only cannot be written"),
    ("binarize-read-only", "scripts/binarized_data.py",
     lambda w, o: ["--file_path", str(w["text"]), "--tokenizer_type", "bert", "--tokenizer_name", str(w["teacher"]),
                   "--dump_file", str(w["ro"] / "data")], "--dump_file .*read_only/data.x: .*read_only cannot be written"),
    ("counts-read-only", "scripts/token_counts.py",
     lambda w, o: ["--data_file", str(w["data"]), "--token_counts_dump", str(w["ro"] / "c.pickle")],
     "--token_counts_dump .*read_only/c.pickle: .*read_only cannot be written"),
    ("combine-read-only", "scripts/data_combinator.py",
     lambda w, o: ["--file_path_left", str(w["pickle_ok"]), "--file_path_right", str(w["pickle_ok"]),
                   "--tokenizer_name", "tok", "--dump_file", str(w["ro"] / "both")],
     "--dump_file .*read_only/both.x: .*read_only cannot be written"),
    ("extract-read-only", "scripts/extract_distilbert.py",
     lambda w, o: ["--model_name", str(w["teacher"]), "--num_layers", "2", "--dump_checkpoint", str(w["ro"] / "s.pth")],
     "--dump_checkpoint .*read_only/s.pth: .*read_only cannot be written"),
    ("mapping-read-only", "scripts/make_mapping.py",
     lambda w, o: ["--teacher", str(w["teacher"]), "--student", str(w["student_config"]), "--alignment", "middle",
                   "--output", str(w["ro"] / "m.nm")], "--output .*read_only/m.nm: .*read_only cannot be written"),
    ("mlm-output-a-file", "run_mlm.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["text"]), "--do_eval",
                   "--output_dir", str(w["a_file"])], "--output_dir .*a_file.txt is a file, not a folder"),
    # token ids out of range in a pickled corpus (no checksum, no recorded vocabulary)
    ("train-pickle-negative-id", "causal_train.py", lambda w, o: _train(w, o, "--data_file", str(w["pickle_negative"])),
     "--data_file .*ids_negative.pickle: sequence 5 holds token id -4, a token id is never negative"),
    ("train-pickle-id-beyond", "causal_train.py", lambda w, o: _train(w, o, "--data_file", str(w["pickle_beyond"])),
     "--data_file .*ids_beyond.pickle: sequence 5 holds token id 60000, beyond the vocabulary of"),
    ("iia-pickle-negative-id", "run_iia.py",
     lambda w, o: ["--teacher_name", str(w["teacher"]), "--student_name", str(w["teacher"]), "--data_file",
                   str(w["pickle_negative"]), "--sweep", "--output_dir", str(o / "iia")],
     "--data_file .*ids_negative.pickle: sequence 5 holds token id -4"),
    ("iia-pickle-id-beyond", "run_iia.py",
     lambda w, o: ["--teacher_name", str(w["teacher"]), "--student_name", str(w["teacher"]), "--data_file",
                   str(w["pickle_beyond"]), "--sweep", "--output_dir", str(o / "iia")],
     "--data_file .*ids_beyond.pickle: sequence 5 holds token id 60000, beyond the vocabulary"),
    ("combine-pickle-negative-id", "scripts/data_combinator.py",
     lambda w, o: ["--file_path_left", str(w["pickle_negative"]), "--file_path_right", str(w["pickle_ok"]),
                   "--tokenizer_name", "tok", "--dump_file", str(o / "both")],
     "ids_negative.pickle: sequence 5 holds token id -4, a token id is never negative"),
    # damaged teachers
    ("extract-truncated-teacher", "scripts/extract_distilbert.py",
     lambda w, o: _extract(w["truncated"], o),
     "--model_name .*truncated_teacher: cannot load it as BertForMaskedLM .*SafetensorError"),
    ("extract-flipped-teacher", "scripts/extract_distilbert.py",
     lambda w, o: _extract(w["flipped"], o),
     "--model_name .*flipped_teacher: cannot load it as BertForMaskedLM .*SafetensorError"),
    ("iia-truncated-teacher", "run_iia.py",
     lambda w, o: _iia_sweep(w, w["truncated"], o, "--tokenizer_name", str(w["teacher"])),
     "--teacher_name .*truncated_teacher: cannot load the bert weights .*SafetensorError"),
    ("iia-flipped-teacher", "run_iia.py",
     lambda w, o: _iia_sweep(w, w["flipped"], o, "--tokenizer_name", str(w["teacher"])),
     "--teacher_name .*flipped_teacher: cannot load the bert weights .*SafetensorError"),
    # malformed task data and options
    ("ner-tokens-a-string", "run_ner.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["ner_string"]), "--do_eval",
                   "--output_dir", str(o / "ner")], "ner.json row 0: tokens must be a list of words"),
    ("mlm-negative-learning-rate", "run_mlm.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--train_file", str(w["text"]), "--do_train",
                   "--learning_rate", "-1", "--output_dir", str(o / "mlm")],
     "--learning_rate must be a finite number > 0, not -1"),
    ("counts-huge-vocab", "scripts/token_counts.py",
     lambda w, o: ["--data_file", str(w["data"]), "--token_counts_dump", str(o / "c.pickle"), "--vocab_size",
                   "100000000000"], "--vocab_size must be between 1 and 16,777,216"),
    ("qa-gold-answer-empty-once-normalised", "run_qa.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--train_file", str(w["qa_ok"]), "--validation_file",
                   str(w["qa_the"]), "--do_train", "--do_eval", "--max_seq_length", "64", "--doc_stride", "16",
                   "--output_dir", str(o / "qa")], "qa_the.json, question 'q1': the answer 'The' is empty once normalised"),
    ("qa-answer-start-beyond-context", "run_qa.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["qa_beyond"]), "--do_eval",
                   "--max_seq_length", "64", "--doc_stride", "16", "--output_dir", str(o / "qa")],
     "qa_beyond.json, question 'q1': answer_start 400 of 'fox' lies beyond its context"),
    ("qa-answer-not-in-context", "run_qa.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["qa_elsewhere"]), "--do_eval",
                   "--max_seq_length", "64", "--doc_stride", "16", "--output_dir", str(o / "qa")],
     "qa_elsewhere.json, question 'q1': the answer 'cat' is not in the context at answer_start 16"),
    ("qa-n-best-0", "run_qa.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["qa_ok"]), "--do_eval",
                   "--n_best_size", "0", "--output_dir", str(o / "qa")], "--n_best_size must be >= 1, not 0"),
    ("glue-table-percent-metric", "scripts/glue_table.py", lambda w, o: ["--result", f"m:sst2={w['glue_percent']}"],
     "eval_accuracy is 85.3, outside \\[-1, 1\\]: already a percentage"),
    ("clm-block-size-0", "run_clm.py",
     lambda w, o: ["--model_name_or_path", str(w["gpt2"]), "--validation_file", str(w["text"]), "--do_eval",
                   "--block_size", "0", "--output_dir", str(o / "clm")], "--block_size must be positive, got 0"),
    ("clm-corpus-too-short", "run_clm.py",
     lambda w, o: ["--model_name_or_path", str(w["gpt2"]), "--validation_file", str(w["short_text"]), "--do_eval",
                   "--block_size", "32", "--output_dir", str(o / "clm")], "short.txt holds fewer than --block_size 32"),
    ("train-corpus-too-short", "causal_train.py", lambda w, o: _train(w, o, "--data_file", str(w["short_bin"])),
     "short.bin \\(mmap, 3 sequences, 15 tokens\\): 0 usable sequence\\(s\\) after cleaning"),
    ("train-crafted-student-weights", "causal_train.py",
     lambda w, o: _train(w, o, "--student_pretrained_weights", str(w["crafted_pth"])),
     "crafted.pth: not a torch state dict \\(refused by weights-only loading: it needs posix.system"),
    # values that passed every check and failed at the first step (or, for --adam_epsilon, trained nothing)
    ("train-temperature-nan", "causal_train.py", lambda w, o: _train(w, o, "--temperature", "nan"),
     "--temperature must be a finite number, not nan"),
    ("train-learning-rate-inf", "causal_train.py", lambda w, o: _train(w, o, "--learning_rate", "inf"),
     "--learning_rate must be a finite number, not inf"),
    ("train-adam-epsilon-inf", "causal_train.py", lambda w, o: _train(w, o, "--adam_epsilon", "inf"),
     "--adam_epsilon must be a finite number, not inf"),
    # --fsdp (issue 23): misuse is named before anything is loaded; a sharded checkpoint needs --fsdp
    ("train-fsdp-without-torchrun", "causal_train.py", lambda w, o: _train(w, o, "--fsdp"),
     "--fsdp shards the models across the processes of torchrun: launch with `torchrun --nproc_per_node N"),
    ("train-fsdp-fp16", "causal_train.py", lambda w, o: _train(w, o, "--fsdp", "--fp16"),
     "--fp16 cannot be combined with --fsdp .*use --bf16"),
    ("train-fsdp-teacher-alone", "causal_train.py", lambda w, o: _train(w, o, "--fsdp_teacher"),
     "--fsdp_teacher needs --fsdp"),
    ("train-fsdp-offload-alone", "causal_train.py", lambda w, o: _train(w, o, "--fsdp_cpu_offload"),
     "--fsdp_cpu_offload needs --fsdp"),
    ("train-sharded-checkpoint-without-fsdp", "causal_train.py",
     lambda w, o: _train(w, o, "--resume_from", str(w["sharded_checkpoint"])),
     "checkpoint-3 was written by an --fsdp run \\(sharded\\): resume it with --fsdp under torchrun .*"
     "scripts/consolidate_checkpoint.py"),
] + [  # the third attack: tracebacks and silent results in the fine-tuning and data scripts
    ("glue-accumulation-0", "run_glue.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--task_name", "sst2", "--train_file", str(w["text"]),
                   "--do_train", "--gradient_accumulation_steps", "0", "--output_dir", str(o / "glue")],
     "--gradient_accumulation_steps must be >= 1, not 0"),
    ("glue-max-train-samples-0", "run_glue.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--task_name", "sst2", "--train_file", str(w["text"]),
                   "--do_train", "--max_train_samples", "0", "--output_dir", str(o / "glue")],
     "--max_train_samples must be >= 1 \(or left out: every row\), not 0"),
    ("glue-no-step", "run_glue.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--task_name", "sst2", "--train_file", str(w["text"]),
                   "--do_train", "--num_train_epochs", "-1", "--max_steps", "-1", "--output_dir", str(o / "glue")],
     "--num_train_epochs must be a finite number > 0 when --max_steps is -1, not -1"),
    ("mlm-max-steps-0", "run_mlm.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--train_file", str(w["text"]), "--do_train",
                   "--max_steps", "0", "--output_dir", str(o / "mlm")],
     "--max_steps must be -1 \(train for --num_train_epochs\) or >= 1, not 0"),
    ("mlm-one-word", "run_mlm.py",
     lambda w, o: ["--model_name_or_path", str(w["teacher"]), "--train_file", str(w["one_word"]), "--do_train",
                   "--max_steps", "2", "--output_dir", str(o / "mlm")],
     "one_word.txt has 1 token\(s\) that can be masked; at --mlm_probability 0.15 .* nothing to predict"),
    ("mlm-nan-dropout", "run_mlm.py",
     lambda w, o: ["--model_name_or_path", str(w["nan_teacher"]), "--validation_file", str(w["text"]), "--do_eval",
                   "--output_dir", str(o / "mlm")], "--model_name_or_path .*nan_teacher: the config's hidden_dropout_prob "
                                                    "is nan; give a finite number"),
    ("mlm-nan-override", "run_mlm.py",
     lambda w, o: ["--model_type", "bert", "--tokenizer_name", str(w["teacher"]), "--config_overrides",
                   "hidden_dropout_prob=nan", "--train_file", str(w["text"]), "--do_train", "--output_dir", str(o / "m")],
     "--config_overrides 'hidden_dropout_prob=nan': the config's hidden_dropout_prob is nan"),
    ("train-nan-dropout", "causal_train.py", lambda w, o: _train(w, o, "--student_config", str(w["nan_student"])),
     "--student_config .*nan_student.json: the config's dropout is nan; give a finite number"),
    ("train-nan-teacher", "causal_train.py", lambda w, o: _train(w, o, "--teacher_name", str(w["nan_teacher"])),
     "--teacher_name .*nan_teacher: the config's hidden_dropout_prob is nan"),
    ("train-mask-nothing", "causal_train.py", lambda w, o: _train(w, o, "--mlm_mask_prop", "0"),
     "--mlm_mask_prop 0 masks no token, so --alpha_mlm would train on nothing"),
    ("train-bf16-without-a-gpu", "causal_train.py", lambda w, o: _train(w, o, "--n_gpu", "1", "--bf16"),
     "--n_gpu 1 --bf16: torch sees no CUDA GPU here. To train on the CPU, run the same command with --n_gpu 0"),
    ("extract-nan-teacher", "scripts/extract_distilbert.py",
     lambda w, o: _extract(w["nan_teacher"], o),
     "--model_name .*nan_teacher: the config's hidden_dropout_prob is nan"),
    ("iia-nan-teacher", "run_iia.py",
     lambda w, o: _iia_sweep(w, w["nan_teacher"], o),
     "--teacher_name .*nan_teacher: the config's hidden_dropout_prob is nan"),
    ("train-skew-with-tvd", "causal_train.py", lambda w, o: _train(w, o, "--divergence", "tvd", "--skew", "0.1"),
     "--divergence tvd: a skew applies to forward_kl and reverse_kl, not tvd"),
    ("train-jsd-beta-beyond-1", "causal_train.py", lambda w, o: _train(w, o, "--divergence", "jsd", "--jsd_beta", "1.5"),
     "--divergence jsd: beta must lie in \\[0, 1\\] and skew in \\[0, 1\\)"),
    ("train-on-policy-masked-lm", "causal_train.py", lambda w, o: _train(w, o, "--on_policy_fraction", "0.5"),
     "--on_policy_fraction needs a causal-LM student \\(it samples continuations\\)"),
    ("train-source-kd-with-diito", "causal_train.py", lambda w, o: _train(w, o, "--source_kd"),
     "--source_kd is standard distillation on the base and source sequences: drop the causal losses"),
    ("train-snapshot-interval-negative", "causal_train.py", lambda w, o: _train(w, o, "--snapshot_interval", "-1"),
     "--snapshot_interval must be >= 0, not -1"),
    ("train-data-fraction-zero", "causal_train.py", lambda w, o: _train(w, o, "--data_fraction", "0"),
     r"--data_fraction must be in \(0, 1\], not 0.0"),
    ("counts-empty-corpus", "scripts/token_counts.py",
     lambda w, o: ["--data_file", str(w["empty_corpus"]), "--token_counts_dump", str(o / "c.pickle")],
     "--data_file .*empty.pickle holds no token"),
    ("counts-another-vocabulary", "scripts/token_counts.py",
     lambda w, o: ["--data_file", str(w["data"]), "--token_counts_dump", str(o / "c.pickle"), "--vocab_size", "30522"],
     "--vocab_size 30522 differs from the \d+ entries of the tokenizer that binarized --data_file"),
    ("binarize-into-proc", "scripts/binarized_data.py",
     lambda w, o: ["--file_path", str(w["text"]), "--tokenizer_type", "bert", "--tokenizer_name", str(w["teacher"]),
                   "--dump_file", "/proc/data"], "cannot write /proc/data.train.*: .*no file can be created in /proc"),
    ("mapping-into-proc", "scripts/make_mapping.py",
     lambda w, o: ["--teacher", str(w["teacher"]), "--student", str(w["student_config"]), "--alignment", "middle",
                   "--output", "/proc/m.nm"], "cannot write /proc/m.nm: .*no file can be created in /proc"),
]


def _sharded_checkpoint(root, setup):
    """A sealed checkpoint folder shaped as an --fsdp run writes it (DCP's index and a shard, the state, the
    config, the manifest): what a run without --fsdp is given by mistake. (A real one needs torchrun.)"""
    import shutil

    import torch

    from checkpoints import write_manifest

    folder = root / "sharded" / "checkpoint-3"
    folder.mkdir(parents=True)
    (folder / ".metadata").write_bytes(b"not read: the engine is checked first")
    (folder / "__0_0.distcp").write_bytes(b"a shard")
    torch.save({"n_step": 3, "world_size": 2}, folder / "training_state.pt")
    shutil.copy(setup["student_config"], folder / "config.json")
    write_manifest(folder)
    return folder


def _snapshot(root: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("script, build, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_message_exit_2_and_writes_nothing(world, tmp_path, monkeypatch, caplog, capsys,
                                                                 script, build, message, request):
    out = tmp_path / "out"
    if world["ro"] is None and "read-only" in request.node.callspec.id:
        pytest.skip("no folder can be made read-only here (chmod does not stop root and chattr is unavailable)")
    if "without-a-gpu" in request.node.callspec.id:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is here")
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
    assert "Re-running `torch.load`" not in errors[0]  # torch's advice to unpickle without restriction is not ours
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))
    assert _snapshot(world["root"]) == before
    assert not (world["root"] / "pwned").exists()


# --- a full disk -------------------------------------------------------------------------------------------
# Each script writing into a file system with no room left: exit 2, one message naming the target and the cause,
# no traceback, nothing left behind. The disk is real: a small tmpfs, filled, mounted in a mount namespace of the
# child process only (`unshare -m`, root); skipped where that is not allowed.
_RUNNER = r'''
import json, logging, os, runpy, sys, traceback
full, cases = sys.argv[1], json.loads(sys.argv[2])
errors = []
class Keep(logging.Handler):
    def emit(self, record):
        if record.levelno >= logging.ERROR:
            errors.append(record.getMessage())
logging.getLogger().addHandler(Keep())
results = {}
for name, script, argv in cases:
    del errors[:]
    sys.argv = [script, *argv]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code
    except BaseException:
        code = "traceback: " + traceback.format_exc()[-1500:]
    left = sorted(os.path.relpath(os.path.join(d, f), full) for d, dirs, files in os.walk(full) for f in files + dirs)
    results[name] = {"code": code, "errors": list(errors), "left": [p for p in left if p != "filler"]}
print("RESULTS " + json.dumps(results))
'''


def _full_disk_cases(w, full):
    iia = ["--teacher_name", str(w["teacher"]), "--student_name", str(w["teacher"]), "--data_file", str(w["text"]),
           "--num_pairs", "8", "--batch_size", "8", "--n_bootstrap", "10", "--no_progress", "--device", "cpu"]
    return [
        ("binarize", "scripts/binarized_data.py", ["--file_path", str(w["text"]), "--tokenizer_type", "bert",
                                                    "--tokenizer_name", str(w["teacher"]), "--dump_file", f"{full}/data"]),
        ("counts", "scripts/token_counts.py", ["--data_file", str(w["data"]), "--token_counts_dump", f"{full}/c.pickle"]),
        ("combine", "scripts/data_combinator.py", ["--file_path_left", str(w["pickle_ok"]), "--file_path_right",
                                                   str(w["pickle_ok"]), "--tokenizer_name", "tok", "--dump_file",
                                                   f"{full}/both"]),
        ("extract", "scripts/extract_distilbert.py", ["--model_name", str(w["teacher"]), "--num_layers", "2",
                                                      "--dump_checkpoint", f"{full}/s.pth"]),
        ("iia", "run_iia.py", [*iia, "--sweep", "--output_dir", f"{full}/iia"]),
        ("mlm-eval", "run_mlm.py", ["--model_name_or_path", str(w["teacher"]), "--validation_file", str(w["text"]),
                                    "--do_eval", "--per_device_eval_batch_size", "4", "--max_eval_samples", "8",
                                    "--output_dir", f"{full}/mlm"]),
        ("mlm-train", "run_mlm.py", ["--model_name_or_path", str(w["teacher"]), "--train_file", str(w["text"]),
                                     "--do_train", "--max_steps", "1", "--save_strategy", "no", "--report_to", "none",
                                     "--per_device_train_batch_size", "4", "--output_dir", f"{full}/mlm_train"]),
        ("train", "causal_train.py", train_argv(w, full / "run", "--max_steps", "1")),
    ]


def test_a_full_disk_gives_one_message_exit_2_and_leaves_nothing(world, tmp_path):
    import json
    import shutil
    import subprocess

    from helpers import SUBPROCESS_ENV

    if not shutil.which("unshare") or not shutil.which("mount"):
        pytest.skip("needs unshare and mount")
    full = tmp_path / "full"
    full.mkdir()
    cases = _full_disk_cases(world, full)
    # the tmpfs is filled to the last block, so every write to it fails with ENOSPC
    script = (f"mount -t tmpfs -o size=256k tmpfs {full} || exit 77; "
              f"dd if=/dev/zero of={full}/filler bs=4k >/dev/null 2>&1; "
              f"exec {sys.executable} -c {shlex_quote(_RUNNER)} {full} {shlex_quote(json.dumps(cases))}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=900)
    if proc.returncode == 77 or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr[-300:]}")
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line, proc.stderr[-3000:]
    results = json.loads(line[len("RESULTS "):])
    assert sorted(results) == sorted(c[0] for c in cases)

    def sound(r):  # exit 2, one message naming the disk and the target; no half-written file, temporary or folder
        return (r["code"] == 2 and len(r["errors"]) == 1 and "no space left on device" in r["errors"][0]
                and str(full) in r["errors"][0] and not r["left"])

    failed = {name: r for name, r in results.items() if not sound(r)}
    assert not failed, failed
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def shlex_quote(text):
    import shlex

    return shlex.quote(text)
