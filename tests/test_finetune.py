"""The fine-tuning scripts end to end on tiny local models and files (CPU, offline, a few steps each)."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from helpers import glue_args

import finetune_common
import run_glue
import run_mlm
import run_ner
import run_qa
from utils import CliError, run_cli

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def vocab_size(tokenizer_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, vocab_size) -> Path:
    """A 2-layer, 32-wide BertForMaskedLM saved with save_pretrained (no tokenizer in the folder)."""
    from transformers import BertConfig, BertForMaskedLM

    from devices import set_seed

    set_seed(0)
    config = BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )
    path = tmp_path_factory.mktemp("tiny_bert")
    BertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, vocab_size) -> Path:
    """A DistilBertForMaskedLM folder, as the distiller writes its student."""
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    from devices import set_seed

    set_seed(0)
    config = DistilBertConfig(
        vocab_size=vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128
    )
    path = tmp_path_factory.mktemp("tiny_student")
    DistilBertForMaskedLM(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_cache")


def common(out: Path, cache_dir: Path, tokenizer_dir: Path) -> list[str]:
    return [
        "--output_dir", str(out), "--tokenizer_name", str(tokenizer_dir), "--cache_dir", str(cache_dir),
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0",
        "--seed", "0", "--per_device_eval_batch_size", "8", "--logging_steps", "50",
    ]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_csv(path: Path, header: list[str], rows: list) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


POSITIVE = ["a great and wonderful film", "i loved every minute", "truly excellent work", "good fun for all"]
NEGATIVE = ["a dull and boring mess", "i hated every minute", "truly terrible work", "bad and slow"]


def sst2_rows(n: int, flip: bool = False) -> list:
    rows = []
    for i in range(n):
        label = i % 2
        text = (POSITIVE if label else NEGATIVE)[i % 4]
        rows.append([text, 1 - label if flip else label])
    return rows


def assert_finite(results: dict, *keys: str) -> None:
    for key in keys:
        assert key in results, f"{key} missing from {sorted(results)}"
        assert math.isfinite(results[key]), f"{key} = {results[key]}"


def expect_cli_error(caplog, main, argv, *fragments) -> str:
    """Run `main(argv)` under run_cli: it must exit non-zero and log a message holding every fragment."""
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda: main(argv))
    assert exit_info.value.code not in (0, None)
    message = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ----------------------------------------------------------------------------------------------- MLM


def test_mlm_perplexity_is_repeatable_and_drops_with_training(tmp_path, tiny_bert, tokenizer_dir, cache_dir, corpus_lines):
    text = tmp_path / "wiki.txt"
    text.write_text("\n".join(corpus_lines[:40]) + "\n")
    args = ["--model_name_or_path", str(tiny_bert), "--validation_file", str(text), "--do_eval", "--max_seq_length", "64"]

    first = run_mlm.main(args + common(tmp_path / "eval1", cache_dir, tokenizer_dir))
    # a fresh cache: the masked set must be recomputed, not read back from the datasets cache
    second = run_mlm.main(args + common(tmp_path / "eval2", tmp_path / "fresh_cache", tokenizer_dir))
    saved = read_json(tmp_path / "eval1" / "eval_results.json")
    assert_finite(saved, "perplexity", "eval_loss")
    assert saved["perplexity"] == pytest.approx(math.exp(saved["eval_loss"]))
    assert first["perplexity"] == second["perplexity"]

    trained = run_mlm.main(
        args
        + ["--train_file", str(text), "--do_train", "--max_steps", "40", "--learning_rate", "5e-3",
           "--per_device_train_batch_size", "8", "--save_strategy", "no"]
        + common(tmp_path / "trained", cache_dir, tokenizer_dir)
    )
    out = tmp_path / "trained"
    for name in ("eval_results.json", "train_results.json", "all_results.json", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert trained["perplexity"] < 0.7 * first["perplexity"]


def test_mlm_from_scratch_line_by_line_with_held_out_split(tmp_path, tokenizer_dir, cache_dir, corpus_lines, vocab_size):
    train = tmp_path / "train.json"
    write_jsonl(train, [{"text": line} for line in corpus_lines[:50]])
    results = run_mlm.main(
        ["--model_type", "bert", "--train_file", str(train), "--validation_split_percentage", "20",
         "--config_overrides", "num_hidden_layers=1,hidden_size=32,num_attention_heads=2,intermediate_size=64,max_position_embeddings=64",
         "--line_by_line", "--max_seq_length", "48", "--do_train", "--do_eval", "--max_steps", "3",
         "--per_device_train_batch_size", "4", "--save_strategy", "no"]
        + common(tmp_path / "scratch", cache_dir, tokenizer_dir)
    )
    assert_finite(results, "perplexity")
    assert results["eval_samples"] == 10
    config = read_json(tmp_path / "scratch" / "config.json")
    assert config["vocab_size"] == vocab_size and config["num_hidden_layers"] == 1 and config["hidden_size"] == 32
    assert (tmp_path / "scratch" / "tokenizer.json").is_file()  # a usable teacher folder


def test_mlm_reads_a_save_to_disk_folder(tmp_path, tiny_bert, tokenizer_dir, cache_dir, corpus_lines):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "wikitext_disk"
    DatasetDict(
        {"train": Dataset.from_dict({"text": corpus_lines[:20]}), "test": Dataset.from_dict({"text": corpus_lines[20:30]})}
    ).save_to_disk(str(folder))
    results = run_mlm.main(
        ["--model_name_or_path", str(tiny_bert), "--dataset_dir", str(folder), "--do_eval", "--max_seq_length", "32"]
        + common(tmp_path / "disk", cache_dir, tokenizer_dir)
    )
    assert_finite(results, "perplexity")


# ---------------------------------------------------------------------------------------------- GLUE


def test_glue_sst2_fine_tunes_a_distilbert_student(tmp_path, tiny_student, tokenizer_dir, cache_dir):
    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], sst2_rows(32))
    dev = write_csv(tmp_path / "dev.csv", ["sentence", "label"], sst2_rows(8))
    out = tmp_path / "sst2"
    results = run_glue.main(
        ["--model_name_or_path", str(tiny_student), "--task_name", "sst2", "--train_file", str(train),
         "--validation_file", str(dev), "--test_file", str(dev), "--do_train", "--do_eval", "--do_predict",
         "--max_steps", "6", "--learning_rate", "1e-3", "--per_device_train_batch_size", "8", "--save_strategy", "no"]
        + common(out, cache_dir, tokenizer_dir)
    )
    assert_finite(read_json(out / "eval_results.json"), "eval_accuracy", "eval_loss")
    assert_finite(results, "train_loss")
    config = read_json(out / "config.json")
    assert config["architectures"] == ["DistilBertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    lines = (out / "predict_results_sst2.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 9
    assert {line.split("\t")[1] for line in lines[1:]} <= {"negative", "positive"}


def test_glue_mnli_reports_matched_and_mismatched(tmp_path, tiny_bert, tokenizer_dir, cache_dir):
    names = ["entailment", "neutral", "contradiction"]
    rows = [{"premise": POSITIVE[i % 4], "hypothesis": NEGATIVE[(i + 1) % 4], "label": names[i % 3]} for i in range(12)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    matched = write_jsonl(tmp_path / "matched.jsonl", rows[:6])
    mismatched = write_jsonl(tmp_path / "mismatched.jsonl", [dict(r, label=i % 3) for i, r in enumerate(rows[6:])])
    results = run_glue.main(
        ["--model_name_or_path", str(tiny_bert), "--task_name", "mnli", "--train_file", str(train),
         "--validation_file", str(matched), "--validation_mismatched_file", str(mismatched),
         "--do_train", "--do_eval", "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no"]
        + common(tmp_path / "mnli", cache_dir, tokenizer_dir)
    )
    saved = read_json(tmp_path / "mnli" / "eval_results.json")
    assert_finite(saved, "eval_accuracy", "eval_accuracy_mm")
    assert saved["eval_samples"] == 6 and saved["eval_samples_mm"] == 6
    assert results["eval_accuracy_mm"] == saved["eval_accuracy_mm"]


def test_glue_stsb_and_custom_data_without_task(tmp_path, tiny_bert, tokenizer_dir, cache_dir):
    pairs = [[POSITIVE[i % 4], NEGATIVE[i % 4], float(i % 5)] for i in range(10)]
    stsb = write_csv(tmp_path / "stsb.csv", ["sentence1", "sentence2", "label"], pairs)
    results = run_glue.main(
        ["--model_name_or_path", str(tiny_bert), "--task_name", "stsb", "--train_file", str(stsb),
         "--validation_file", str(stsb), "--do_train", "--do_eval", "--max_steps", "2", "--save_strategy", "no"]
        + common(tmp_path / "stsb", cache_dir, tokenizer_dir)
    )
    assert_finite(results, "eval_pearson", "eval_spearmanr")
    custom = write_csv(tmp_path / "custom.csv", ["review", "label"], [[t, ["bad", "good"][l]] for t, l in sst2_rows(8)])
    results = run_glue.main(
        ["--model_name_or_path", str(tiny_bert), "--train_file", str(custom), "--validation_file", str(custom),
         "--do_train", "--do_eval", "--max_steps", "2", "--save_strategy", "no"]
        + common(tmp_path / "custom", cache_dir, tokenizer_dir)
    )
    assert_finite(results, "eval_accuracy")
    assert read_json(tmp_path / "custom" / "config.json")["label2id"] == {"bad": 0, "good": 1}


def test_glue_resume_from_checkpoint(tmp_path, tiny_bert, tokenizer_dir, cache_dir):
    """`--resume_from_checkpoint True` continues the last checkpoint; --overwrite_output_dir starts afresh."""
    from safetensors.torch import load_file

    train = write_csv(tmp_path / "train.csv", ["sentence", "label"], sst2_rows(16))
    flipped = write_csv(tmp_path / "flipped.csv", ["sentence", "label"], sst2_rows(16, flip=True))
    out = tmp_path / "run"
    base = ["--model_name_or_path", str(tiny_bert), "--task_name", "sst2", "--do_train", "--max_steps", "4",
            "--learning_rate", "1e-3", "--per_device_train_batch_size", "4", "--save_steps", "2"]
    run_glue.main(base + ["--train_file", str(train)] + common(out, cache_dir, tokenizer_dir))
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    at_step_4 = load_file(out / "checkpoint-4" / "model.safetensors")

    # Resumed at step 4 of 4: no step is taken, so the other data leaves the weights untouched.
    run_glue.main(base + ["--train_file", str(flipped), "--resume_from_checkpoint", "True"] + common(out, cache_dir, tokenizer_dir))
    resumed = load_file(out / "model.safetensors")
    assert all((resumed[k] == v).all() for k, v in at_step_4.items())
    assert read_json(out / "trainer_state.json")["global_step"] == 4

    # Resuming further, by path.
    run_glue.main(
        base + ["--max_steps", "6", "--train_file", str(train), "--resume_from_checkpoint", str(out / "checkpoint-4")]
        + common(out, cache_dir, tokenizer_dir)
    )
    assert read_json(out / "trainer_state.json")["global_step"] == 6 and (out / "checkpoint-6").is_dir()

    run_glue.main(base + ["--train_file", str(flipped), "--overwrite_output_dir"] + common(out, cache_dir, tokenizer_dir))
    fresh = load_file(out / "model.safetensors")
    assert any(not (fresh[k] == v).all() for k, v in at_step_4.items())
    assert not (out / "checkpoint-6").exists()

    # Without a flag, --do_train picks up the last checkpoint in --output_dir (HF's examples' behaviour),
    # unless the run there finished (train_results.json): that folder is refused.
    with pytest.raises(CliError, match="finished training run"):
        run_glue.main(base + ["--train_file", str(train)] + common(out, cache_dir, tokenizer_dir))
    (out / "train_results.json").unlink()  # as a run killed after its last checkpoint leaves it
    at_step_4 = load_file(out / "checkpoint-4" / "model.safetensors")
    run_glue.main(base + ["--train_file", str(train)] + common(out, cache_dir, tokenizer_dir))
    resumed = load_file(out / "model.safetensors")
    assert all((resumed[k] == v).all() for k, v in at_step_4.items())


# ----------------------------------------------------------------------------------------------- NER


def ner_rows(n: int, offset: int = 0) -> list[dict]:
    people, places, words = ["Alice", "Bob"], ["Paris", "London"], ["went", "to", "the", "and", "saw", "met"]
    rows = []
    for i in range(n):
        j = i + offset
        tokens = [people[j % 2], words[j % 6], words[(j + 1) % 6], places[j % 2], words[(j + 2) % 6], "New", "York"]
        tags = ["B-PER", "O", "O", "B-LOC", "O", "B-LOC", "I-LOC"]
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def test_ner_trains_evaluates_and_tags(tmp_path, tiny_bert, tokenizer_dir, cache_dir):
    train = write_jsonl(tmp_path / "train.json", ner_rows(16))
    dev = write_jsonl(tmp_path / "dev.json", ner_rows(6, offset=1))
    out = tmp_path / "ner"
    results = run_ner.main(
        ["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file", str(dev),
         "--test_file", str(dev), "--do_train", "--do_eval", "--do_predict", "--max_steps", "6",
         "--learning_rate", "5e-3", "--per_device_train_batch_size", "8", "--save_strategy", "no",
         "--return_entity_level_metrics"]
        + common(out, cache_dir, tokenizer_dir)
    )
    saved = read_json(out / "eval_results.json")
    assert_finite(saved, "eval_precision", "eval_recall", "eval_f1", "eval_accuracy")
    assert "eval_LOC_f1" in saved and results["eval_f1"] == saved["eval_f1"]
    tagged = (out / "predictions.txt").read_text().splitlines()
    assert len(tagged) == 6 and all(len(line.split()) == 7 for line in tagged)

    # Integer tags need --label_names; --label_all_tokens labels every sub-token.
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    as_ids = [{"tokens": r["tokens"], "ner_tags": [names.index(t) for t in r["ner_tags"]]} for r in ner_rows(8)]
    ids_file = write_jsonl(tmp_path / "ids.json", as_ids)
    results = run_ner.main(
        ["--model_name_or_path", str(tiny_bert), "--train_file", str(ids_file), "--validation_file", str(ids_file),
         "--label_names", ",".join(names), "--label_all_tokens", "--do_train", "--do_eval", "--max_steps", "2",
         "--save_strategy", "no"]
        + common(tmp_path / "ner_ids", cache_dir, tokenizer_dir)
    )
    assert_finite(results, "eval_f1")
    assert read_json(tmp_path / "ner_ids" / "config.json")["id2label"]["4"] == "I-LOC"


# ------------------------------------------------------------------------------------------------ QA


def qa_examples(n: int, unanswerable: int = 0) -> list[dict]:
    people, cities = ["Alice", "Bob", "Carol", "Dave"], ["Paris", "London", "Rome", "Berlin"]
    rows = []
    for i in range(n):
        person, city = people[i % 4], cities[(i + 1) % 4]
        context = (
            f"The museum opened many years ago and draws visitors every season. {person} lives in {city} "
            "and works at the museum. The weather there is usually mild in spring."
        )
        if i < unanswerable:
            rows.append({"id": f"q{i}", "title": "t", "context": context, "question": "What colour is the sky?",
                         "answers": {"text": [], "answer_start": []}})
        else:
            rows.append({"id": f"q{i}", "title": "t", "context": context, "question": f"Where does {person} live?",
                         "answers": {"text": [city], "answer_start": [context.index(f"in {city}") + 3]}})
    return rows


def nested(rows: list[dict]) -> dict:
    """The official SQuAD layout of flattened rows."""
    data = []
    for r in rows:
        answers = [{"text": t, "answer_start": s} for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]
        qa = {"id": r["id"], "question": r["question"], "answers": answers, "is_impossible": not answers}
        data.append({"title": r["title"], "paragraphs": [{"context": r["context"], "qas": [qa]}]})
    return {"version": "v2.0", "data": data}


def test_qa_windows_and_postprocessing_recover_the_gold_answer(tokenizer_dir):
    """Perfect logits built from the training labels decode back to the gold text across several windows."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    examples = qa_examples(4)
    batch = {k: [e[k] for e in examples] for k in examples[0]}
    train = run_qa.prepare_train_features(batch, tokenizer, max_seq_length=24, doc_stride=8)
    evalf = run_qa.prepare_eval_features(batch, tokenizer, max_seq_length=24, doc_stride=8)
    assert len(train["input_ids"]) == len(evalf["input_ids"]) > len(examples)  # several windows per context
    width = max(len(ids) for ids in train["input_ids"])
    import numpy as np

    start_logits = np.full((len(train["input_ids"]), width), -10.0)
    end_logits = np.full_like(start_logits, -10.0)
    for i, (s, e) in enumerate(zip(train["start_positions"], train["end_positions"])):
        if s != 0:
            start_logits[i, s], end_logits[i, e] = 10.0, 10.0
    predictions, _ = run_qa.postprocess_predictions(
        examples, evalf, start_logits, end_logits, version_2_with_negative=False, n_best_size=5,
        max_answer_length=10, null_score_diff_threshold=0.0,
    )
    assert predictions == {e["id"]: e["answers"]["text"][0] for e in examples}


def test_qa_squad_v1_and_v2_local_files(tmp_path, tiny_bert, tokenizer_dir, cache_dir):
    train = write_jsonl(tmp_path / "train.json", qa_examples(8))
    dev = tmp_path / "dev.json"
    dev.write_text(json.dumps(nested(qa_examples(4))))
    out = tmp_path / "squad"
    results = run_qa.main(
        ["--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file", str(dev),
         "--do_train", "--do_eval", "--max_steps", "3", "--per_device_train_batch_size", "4",
         "--max_seq_length", "48", "--doc_stride", "16", "--save_strategy", "no"]
        + common(out, cache_dir, tokenizer_dir)
    )
    saved = read_json(out / "eval_results.json")
    assert_finite(saved, "eval_exact_match", "eval_f1")
    assert set(read_json(out / "predictions.json")) == {f"q{i}" for i in range(4)}
    assert results["eval_f1"] == saved["eval_f1"]

    v2_dev = tmp_path / "dev_v2.json"
    v2_dev.write_text(json.dumps(nested(qa_examples(4, unanswerable=2))))
    results = run_qa.main(
        ["--model_name_or_path", str(tiny_bert), "--validation_file", str(v2_dev), "--do_eval",
         "--version_2_with_negative", "--max_seq_length", "48", "--doc_stride", "16"]
        + common(tmp_path / "squad_v2", cache_dir, tokenizer_dir)
    )
    assert_finite(results, "eval_exact", "eval_f1", "eval_HasAns_exact", "eval_NoAns_exact")
    assert results["eval_HasAns_total"] == 2 and results["eval_NoAns_total"] == 2
    assert (tmp_path / "squad_v2" / "null_odds.json").is_file()


# ---------------------------------------------------------------------------------------- bad inputs


def test_bad_inputs_name_the_culprit(tmp_path, caplog, tiny_bert, tokenizer_dir, cache_dir, vocab_size):
    args = common(tmp_path / "bad", cache_dir, tokenizer_dir) + ["--model_name_or_path", str(tiny_bert)]
    good = write_csv(tmp_path / "good.csv", ["sentence", "label"], sst2_rows(4))

    expect_cli_error(caplog, run_glue.main, ["--task_name", "sst5", "--do_eval"] + args, "sst5", "sst2")

    no_column = write_csv(tmp_path / "nocol.csv", ["text", "label"], sst2_rows(4))
    expect_cli_error(
        caplog, run_glue.main, ["--task_name", "sst2", "--train_file", str(no_column), "--do_train"] + args,
        str(no_column), "sentence",
    )
    bad_label = write_csv(tmp_path / "badlabel.csv", ["sentence", "label"], sst2_rows(3) + [["so so", "maybe"]])
    expect_cli_error(
        caplog, run_glue.main,
        ["--task_name", "sst2", "--train_file", str(good), "--validation_file", str(bad_label), "--do_train", "--do_eval"] + args,
        "'maybe'", str(bad_label),
    )
    dev = write_jsonl(tmp_path / "ner_dev.json", [{"tokens": ["Rome"], "ner_tags": ["B-CITY"]}])
    train = write_jsonl(tmp_path / "ner_train.json", ner_rows(2))
    expect_cli_error(
        caplog, run_ner.main, ["--train_file", str(train), "--validation_file", str(dev), "--do_train", "--do_eval"] + args,
        "'B-CITY'", str(dev),
    )
    qa_file = write_jsonl(tmp_path / "qa.json", [{"id": "1", "context": "x", "answers": {"text": ["x"], "answer_start": [0]}}])
    expect_cli_error(caplog, run_qa.main, ["--validation_file", str(qa_file), "--do_eval"] + args, str(qa_file), "question")

    from transformers import BertConfig, BertForMaskedLM

    small = tmp_path / "small_vocab"
    BertForMaskedLM(
        BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(small)
    expect_cli_error(
        caplog, run_glue.main,
        ["--task_name", "sst2", "--validation_file", str(good), "--do_eval", "--model_name_or_path", str(small)]
        + common(tmp_path / "bad", cache_dir, tokenizer_dir),
        str(vocab_size), "vocab_size 100", str(tokenizer_dir), str(small),
    )
    expect_cli_error(caplog, run_glue.main, ["--task_name", "sst2", "--do_eval"] + args, "nyu-mll/glue", "--train_file")


def test_bad_input_exits_nonzero_without_traceback(tmp_path, tiny_bert, tokenizer_dir):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_glue.py"), "--model_name_or_path", str(tiny_bert), "--tokenizer_name",
         str(tokenizer_dir), "--task_name", "nosuchtask", "--do_eval", "--output_dir", str(tmp_path / "x")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert "nosuchtask" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("module", [run_mlm, run_glue, run_ner, run_qa])
def test_every_flag_has_help(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "--output_dir" in capsys.readouterr().out
    from transformers import HfArgumentParser

    parser = HfArgumentParser(module.ARGUMENTS)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and action.help.strip(), f"{module.__name__}: {action.option_strings} has no help"


# --------------------------------------------------------------------------------------- GLUE table


def test_glue_table_prints_the_paper_table(tmp_path, capsys):
    import glue_table

    def results(folder: Path, task: str, metrics: dict) -> None:
        (folder / task).mkdir(parents=True, exist_ok=True)
        (folder / task / "eval_results.json").write_text(json.dumps(metrics))

    full = tmp_path / "diito"
    results(full, "cola", {"eval_matthews_correlation": 0.4517})
    results(full, "mnli", {"eval_accuracy": 0.7968, "eval_accuracy_mm": 0.80})
    results(full, "mrpc", {"eval_accuracy": 0.84, "eval_f1": 0.8818})
    results(full, "qnli", {"eval_accuracy": 0.8583})
    results(full, "qqp", {"eval_accuracy": 0.8531, "eval_f1": 0.80})
    results(full, "rte", {"eval_accuracy": 0.6094})
    results(full, "sst-2", {"eval_accuracy": 0.9032})
    results(full, "stsb", {"eval_pearson": 0.8169, "eval_spearmanr": 0.8171})
    partial = tmp_path / "distil"
    results(partial, "cola", {"eval_matthews_correlation": 0.4043})
    extra = tmp_path / "rte_extra.json"
    extra.write_text(json.dumps({"eval_accuracy": 0.601}))

    text = glue_table.main(
        ["--run", f"DIITO (6 layers)={full}", "--run", f"DistilBERT (6 layers)={partial}",
         "--result", f"DistilBERT (6 layers):RTE={extra}"]
    )
    assert capsys.readouterr().out.strip() == text
    average = (45.17 + 79.68 + 88.18 + 85.83 + 85.31 + 60.94 + 90.32 + 81.69) / 8
    assert text.splitlines() == [
        "Model | Average-score | CoLA | MNLI | MRPC | QNLI | QQP | RTE | SST-2 | STS-B |",
        "---|---|---|---|---|---|---|---|---|---|",
        f"DIITO (6 layers) | {average:.2f} | 45.17 | 79.68 | 88.18 | 85.83 | 85.31 | 60.94 | 90.32 | 81.69 |",
        "DistilBERT (6 layers) | (-) | 40.43 | (-) | (-) | (-) | (-) | 60.10 | (-) | (-) |",
    ]
    text = glue_table.main(["--run", f"DIITO={full}", "--mrpc_metric", "acc_f1", "--stsb_metric", "pearson_spearman", "--tokens", "DIITO=0.1B"])
    row = text.splitlines()[2].split(" | ")
    assert row[:2] == ["DIITO", "0.1B"] and row[5] == f"{(84 + 88.18) / 2:.2f}" and row[10] == "81.70 |"


def test_run_scripts_refuse_a_model_folder_without_tokenizer(tmp_path, model_without_tokenizer, tokenizer_dir):
    """transformers 5 builds a 5-entry tokenizer from such a folder: every word would be [UNK]."""
    glue = ["--model_name_or_path", str(model_without_tokenizer), "--do_eval"] + glue_args(tmp_path / "g", tmp_path)
    with pytest.raises(CliError, match="--tokenizer_name.*only its 5 special token"):
        run_glue.main(glue)
    assert not (tmp_path / "g" / "eval_results.json").exists()
    text = tmp_path / "valid.txt"
    text.write_text("a line of text to evaluate on\n" * 4)
    mlm = ["--model_name_or_path", str(model_without_tokenizer), "--validation_file", str(text), "--do_eval",
           "--output_dir", str(tmp_path / "m"), "--use_cpu", "--report_to", "none", "--cache_dir", str(tmp_path / "c")]
    with pytest.raises(CliError, match="--tokenizer_name"):
        run_mlm.main(mlm)
    # With the right tokenizer the same folder is accepted.
    run_glue.main(glue + ["--tokenizer_name", str(tokenizer_dir), "--max_eval_samples", "4"])
    assert (tmp_path / "g" / "eval_results.json").is_file()


def test_no_pinned_memory_on_the_cpu(tmp_path):
    _, _, training_args = finetune_common.parse_args(run_glue.ARGUMENTS, ["--task_name", "sst2", "--output_dir", str(tmp_path), "--use_cpu"], "x")
    assert training_args.dataloader_pin_memory is False
