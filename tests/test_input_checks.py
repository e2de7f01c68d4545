"""input_checks.py: a local path with a typo is named at once, and a tokenizer that is not the model's is refused, in
every script."""
from __future__ import annotations

import binarized_data
import extract
import extract_distilbert
import make_mapping
import pytest
from conftest import ROOT
from helpers import glue_args, train_argv

import causal_train
import run_glue
import run_mlm
from input_checks import check_local_path, check_tokenizer, looks_local
from utils import CliError

CONFIGS = ROOT / "training_configs"


def test_an_extra_tokenizer_entry_is_named(tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(vocab_size=len(tok))
    tok.add_tokens(["<|im_extra|>"])
    with pytest.raises(CliError) as err:
        check_tokenizer(tok, config, tokenizer_flag="--tokenizer_name", tokenizer_name="tok", model_name="the teacher")
    assert f"the entry beyond it: id {len(tok) - 1} '<|im_extra|>' (an added token)" in str(err.value)


def test_check_tokenizer_compares_size_and_special_ids(tokenizer_dir):
    from transformers import AutoTokenizer, BertConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    n = len(tok)
    kwargs = dict(tokenizer_flag="--tokenizer_name", tokenizer_name="tok", model_name="model m")
    check_tokenizer(tok, BertConfig(vocab_size=n, pad_token_id=tok.pad_token_id), **kwargs)
    check_tokenizer(tok, BertConfig(vocab_size=n + 50, pad_token_id=tok.pad_token_id), **kwargs)  # padded rows
    with pytest.raises(CliError, match=f"--tokenizer_name tok has {n} entries .*vocab_size {n - 1}"):
        check_tokenizer(tok, BertConfig(vocab_size=n - 1), **kwargs)
    with pytest.raises(CliError, match="most of the model's vocabulary"):
        check_tokenizer(tok, BertConfig(vocab_size=3 * n), **kwargs)
    with pytest.raises(CliError, match=f"pad_token_id is {tok.pad_token_id} but model m has pad_token_id 7"):
        check_tokenizer(tok, BertConfig(vocab_size=n, pad_token_id=7), **kwargs)


def test_looks_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("./teacher", "/abs/teacher", "~/teacher", "a/b/c", "models/teachr", "teacher/", "my model"):
        assert looks_local(name), name
    for name in ("bert-base-uncased", "google-bert/bert-base-uncased", "nyu-mll/glue"):
        assert not looks_local(name), name
    check_local_path("models", "--x")
    with pytest.raises(CliError, match="--x models/teachr: no such folder"):
        check_local_path("models/teachr", "--x")


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def test_every_script_says_no_such_folder_at_once(tmp_path, distill_setup, corpus_file, tokenizer_dir):
    missing = str(tmp_path / "no_such_teacher")
    cases = [
        (run_glue.main, ["--model_name_or_path", missing, "--tokenizer_name", str(tokenizer_dir), "--do_eval"]
         + glue_args(tmp_path / "g", tmp_path), "--model_name_or_path"),
        (run_mlm.main, ["--model_type", "bert", "--tokenizer_name", missing, "--train_file", str(corpus_file),
                        "--do_train", "--output_dir", str(tmp_path / "m"), "--use_cpu"], "--tokenizer_name"),
        (binarized_data.main, ["--file_path", str(corpus_file), "--tokenizer_name", missing, "--dump_file",
                               str(tmp_path / "d")], "--tokenizer_name"),
        (causal_train.main, _with(train_argv(distill_setup, tmp_path / "run", "--max_steps", "1"), "--teacher_name", missing),
         "--teacher_name"),
        (causal_train.main, train_argv(distill_setup, tmp_path / "run2", "--max_steps", "1", "--tokenizer_name", missing),
         "--tokenizer_name"),
        (extract.main, ["--model_type", "gpt2", "--model_name", missing, "--dump_checkpoint", str(tmp_path / "e.pth")],
         "--model_name"),
        (extract_distilbert.main, ["--model_name", missing, "--dump_checkpoint", str(tmp_path / "e.pth")], "--model_name"),
        (make_mapping.main, ["--teacher", missing, "--student", str(CONFIGS / "distilbert-base-uncased.json"),
                             "--alignment", "middle", "--output", str(tmp_path / "x.nm")], "--teacher"),
    ]
    for main, argv, flag in cases:
        with pytest.raises(CliError, match=f"{flag} {missing}: no such folder"):
            main(argv)
