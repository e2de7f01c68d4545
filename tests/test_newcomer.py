"""A newcomer's path (issue 13): no silent garbage from a wrong tokenizer, no hand-written files.

Tiny local models, tokenizers and corpora only; each script is called in-process.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT

import binarized_data
import causal_train
import extract
import extract_distilbert
import finetune_common
import make_mapping
import run_glue
import run_mlm
import token_counts
from binarized_io import CorpusWriter, load_corpus
from helpers import train_argv
from input_checks import check_local_path, check_tokenizer, looks_local
from neuron_mapping import load_neuron_mapping
from utils import CliError

CONFIGS = ROOT / "training_configs"


@pytest.fixture(scope="module")
def model_without_tokenizer(tmp_path_factory, distill_setup) -> Path:
    """The teacher's weights and config without its tokenizer files, as a student folder is."""
    folder = tmp_path_factory.mktemp("no_tokenizer")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(distill_setup["teacher"] / name, folder / name)
    return folder


def glue_args(out: Path, tmp_path: Path) -> list[str]:
    rows = ["sentence,label"] + [f"{w} film,{i % 2}" for i, w in enumerate(["good", "bad", "great", "dull"] * 4)]
    data = tmp_path / "sst2.csv"
    data.write_text("\n".join(rows) + "\n")
    return [
        "--task_name", "sst2", "--train_file", str(data), "--validation_file", str(data), "--output_dir", str(out),
        "--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-3", "--save_steps", "2", "--max_steps", "4",
        "--cache_dir", str(tmp_path / "cache"),
    ]


# ------------------------------------------------------------------ 1. tokenizer against the model


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


def test_binarized_data_refuses_a_tokenizer_without_vocabulary(tmp_path, model_without_tokenizer, corpus_file):
    argv = ["--file_path", str(corpus_file), "--tokenizer_name", str(model_without_tokenizer),
            "--dump_file", str(tmp_path / "out" / "data")]
    with pytest.raises(CliError, match="--tokenizer_name .*no vocabulary"):
        binarized_data.main(argv)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_causal_train_blames_the_tokenizer_not_the_corpus(tmp_path, distill_setup, model_without_tokenizer):
    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "1")
    argv[argv.index("--teacher_name") + 1] = str(model_without_tokenizer)
    with pytest.raises(CliError, match="--tokenizer_name") as err:
        causal_train.main(argv)
    assert "corpus" not in str(err.value) and "binarized" not in str(err.value)


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


# ----------------------------------------------------------------------------- 2. corpus file names


def test_missing_pickle_names_the_bin_of_the_same_stem(tmp_path, distill_setup):
    stem = tmp_path / "binarized_text.train.bert-base-uncased"
    shutil.copy(distill_setup["data"], f"{stem}.bin")
    for call in (lambda p: load_corpus(p), lambda p: token_counts.main(["--data_file", p, "--token_counts_dump",
                                                                        str(tmp_path / "counts.pickle")])):
        with pytest.raises(CliError, match=f"not found; {stem}.bin exists"):
            call(f"{stem}.pickle")
    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "1")
    argv[argv.index("--data_file") + 1] = f"{stem}.pickle"
    with pytest.raises(CliError, match=f"--data_file {stem}.pickle: binarized corpus not found; {stem}.bin exists"):
        causal_train.main(argv)
    # The reverse, and other names beside it.
    with CorpusWriter(tmp_path / "other.train.tok.pickle", fmt="pickle", vocab_size=10, seed=0) as writer:
        writer.add([1, 2, 3])
    with pytest.raises(CliError, match="other.train.tok.pickle exists"):
        load_corpus(tmp_path / "other.train.tok.bin")
    with pytest.raises(CliError, match="beside it: binarized_text.train.bert-base-uncased.bin"):
        load_corpus(tmp_path / "binarized_text.train.bert-base-cased.bin")


def test_binarized_data_help_states_the_naming_rule(capsys):
    with pytest.raises(SystemExit):
        binarized_data.main(["--help"])
    assert "{dump_file}.{split}.{tokenizer}" in capsys.readouterr().out


# ------------------------------------------------------------- 3. extract -> map -> train, no editing


def test_extract_map_train_chain_needs_no_hand_written_file(tmp_path, distill_setup, caplog):
    """Student folder from extract_distilbert.py, .nm from make_mapping.py, straight into causal_train.py."""
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    student = tmp_path / "student"
    extract_distilbert.main(["--model_name", str(distill_setup["teacher"]), "--dump_checkpoint", str(student),
                             "--num_layers", "2", "--vocab_transform"])
    nm = tmp_path / "maps" / "full.nm"
    make_mapping.main(["--teacher", str(distill_setup["teacher"]), "--student", str(student), "--alignment", "full",
                       "--output", str(nm)])
    mapping = json.loads(nm.read_text())["interchange_variable_mappings"]
    assert [(e["teacher_variable_names"], e["student_variable_names"]) for e in mapping] == [
        (["$L:[0:2]$H:[0:4]$[0:8]"], ["$L:0$H:[0:4]$[0:8]"]),
        (["$L:[2:4]$H:[0:4]$[0:8]"], ["$L:1$H:[0:4]$[0:8]"]),
    ]
    argv = train_argv(distill_setup, tmp_path / "run", "--max_steps", "2", "--checkpoint_interval", "0")
    for flag, value in (("--student_config", student), ("--student_pretrained_weights", student), ("--neuron_mapping", nm)):
        argv[argv.index(flag) + 1] = str(value)
    caplog.set_level(logging.INFO)
    causal_train.main(argv)
    assert f"student initialised from {student}" in caplog.text
    trained = AutoModelForMaskedLM.from_pretrained(tmp_path / "run")
    assert type(trained).__name__ == "DistilBertForMaskedLM" and trained.config.n_layers == 2

    # A full-depth student folder loads with AutoModelForMaskedLM and computes what the teacher computes.
    full = tmp_path / "full_student"
    extract_distilbert.main(["--model_name", str(distill_setup["teacher"]), "--dump_checkpoint", str(full),
                             "--num_layers", "4", "--vocab_transform"])
    teacher = BertForMaskedLM.from_pretrained(distill_setup["teacher"]).eval()
    loaded = AutoModelForMaskedLM.from_pretrained(full).eval()
    ids = torch.randint(5, teacher.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-4)
    assert json.loads((full / "extraction.json").read_text())["teacher_layers"] == [0, 1, 2, 3]


def test_pth_extraction_writes_its_config_beside_it(tmp_path, distill_setup):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    out = tmp_path / "s.pth"
    extract_distilbert.main(["--model_name", str(distill_setup["teacher"]), "--dump_checkpoint", str(out), "--num_layers", "2"])
    config = DistilBertConfig.from_pretrained(tmp_path / "s.config.json")
    assert config.n_layers == 2 and config.dim == 32 and config.vocab_size == len(torch.load(out)["vocab_projector.bias"])
    DistilBertForMaskedLM(config).load_state_dict(torch.load(out), strict=False)
    nm = make_mapping.main(["--teacher", str(distill_setup["teacher"]), "--student", str(out), "--alignment", "middle",
                            "--output", str(tmp_path / "m.nm")])
    assert json.loads(nm.read_text())["interchange_variable_mappings"][0]["student_variable_names"] == ["$L:1$H:[0:4]$[0:8]"]


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_same_family_extraction_folder_loads(kind, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, GPT2Config, GPT2LMHeadModel, RobertaConfig, \
        RobertaForMaskedLM

    torch.manual_seed(0)
    if kind == "gpt2":
        teacher, auto = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=3, n_head=2, n_positions=32)), AutoModelForCausalLM
    else:
        teacher = RobertaForMaskedLM(RobertaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                                   intermediate_size=32, max_position_embeddings=34, type_vocab_size=1))
        auto = AutoModelForMaskedLM
    teacher.eval().save_pretrained(tmp_path / "teacher")
    extract.main(["--model_type", kind, "--model_name", str(tmp_path / "teacher"), "--dump_checkpoint",
                  str(tmp_path / "student"), "--layers", "0,1,2", "--vocab_transform"])
    student = auto.from_pretrained(tmp_path / "student").eval()
    ids = torch.randint(3, 50, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-5)


SHIPPED = [  # (.nm file, alignment, student config of the depth it was written for)
    ("single_middle_layer_6.nm", "single_middle", "distilbert-base-uncased.json"),
    ("single_middle_layer_9.nm", "middle", "distilbert-base-uncased-large.json"),
    ("single_middle_late.nm", "late", "distilbert-base-uncased-small.json"),
    ("multiple_single_middle_late.nm", "multiple_single_middle_late", "distilbert-base-uncased-small.json"),
    ("multiple_single_middle_late_layer_6.nm", "multiple_single_middle_late", "distilbert-base-uncased.json"),
    ("multiple_single_multilayer_layer_3.nm", "full", "distilbert-base-uncased-small.json"),
    ("multiple_single_multilayer_layer_6.nm", "full", "distilbert-base-uncased.json"),
    ("multiple_single_multilayer_layer_9.nm", "multiple_single_multilayer", "distilbert-base-uncased-large.json"),
]


@pytest.mark.parametrize("shipped,alignment,student", SHIPPED)
def test_make_mapping_reproduces_the_shipped_bert_base_files(tmp_path, shipped, alignment, student):
    from transformers import BertConfig

    BertConfig().to_json_file(tmp_path / "bert-base.json")
    out = make_mapping.main(["--teacher", str(tmp_path / "bert-base.json"), "--student", str(CONFIGS / student),
                             "--alignment", alignment, "--output", str(tmp_path / "made.nm")])
    teacher_shape = make_mapping.load_shape(str(tmp_path / "bert-base.json"), "--teacher")
    student_shape = make_mapping.load_shape(str(CONFIGS / student), "--student")
    made = load_neuron_mapping(out, teacher_shape, student_shape)
    original = load_neuron_mapping(CONFIGS / shipped, teacher_shape, student_shape)
    assert [(e.teacher, e.student) for e in made] == [(e.teacher, e.student) for e in original]


def test_make_mapping_any_widths_and_refusals(tmp_path):
    from transformers import DistilBertConfig, GPT2Config

    GPT2Config(n_layer=5, n_embd=48, n_head=3).to_json_file(tmp_path / "t.json")
    DistilBertConfig(n_layers=2, dim=20, n_heads=5, hidden_dim=40).to_json_file(tmp_path / "s.json")
    t, s = make_mapping.load_shape(str(tmp_path / "t.json"), "--t"), make_mapping.load_shape(str(tmp_path / "s.json"), "--s")
    assert make_mapping.alignment_pairs("full", 5, 2) == [([0, 1, 2], 0), ([3, 4], 1)]
    assert make_mapping.build_mapping("late", t, s)["interchange_variable_mappings"] == [
        {"teacher_variable_names": ["$L:3$H:[0:3]$[0:16]"], "student_variable_names": ["$L:0$H:[0:5]$[0:4]"]}]
    with pytest.raises(CliError, match="at least as deep"):
        make_mapping.build_mapping("full", s, t)
    with pytest.raises(CliError, match="3 or more blocks"):
        make_mapping.build_mapping("multiple_single_middle_late", t, s)


# --------------------------------------------------- 5. Trainer checkpoints: complete, loud, finished


def test_trainer_resume_skips_incomplete_and_refuses_finished(tmp_path, tiny_glue_model, tokenizer_dir, caplog):
    out = tmp_path / "run"
    argv = ["--model_name_or_path", str(tiny_glue_model), "--tokenizer_name", str(tokenizer_dir), "--do_train"] + glue_args(out, tmp_path)
    run_glue.main(argv)
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    with pytest.raises(CliError, match="finished training run .*--overwrite_output_dir"):
        run_glue.main(argv)

    # A run killed while saving checkpoint-4: no trainer_state.json there, no train_results.json.
    (out / "checkpoint-4" / "trainer_state.json").unlink()
    (out / "train_results.json").unlink()
    caplog.set_level(logging.WARNING)
    run_glue.main(argv)
    assert f"skipping the incomplete checkpoint {out / 'checkpoint-4'}" in caplog.text
    assert f"RESUMING training from {out / 'checkpoint-2'} (step 2)" in caplog.text
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()

    (out / "checkpoint-4" / "trainer_state.json").write_text('{"global_st')  # truncated
    with pytest.raises(CliError, match="checkpoint-4: not a complete Trainer checkpoint .*truncated"):
        run_glue.main(argv + ["--resume_from_checkpoint", str(out / "checkpoint-4")])
    caplog.clear()
    run_glue.main(argv + ["--resume_from_checkpoint", "latest"])
    assert f"skipping the incomplete checkpoint {out / 'checkpoint-4'}: trainer_state.json is truncated" in caplog.text
    assert f"RESUMING training from {out / 'checkpoint-2'}" in caplog.text
    caplog.clear()
    run_glue.main(argv + ["--resume_from_checkpoint", "latest"])  # checkpoint-4 is complete again: at the end
    assert f"{out / 'checkpoint-4'} already reached step 4 of 4: no training step is left" in caplog.text
    caplog.clear()
    run_glue.main(argv + ["--overwrite_output_dir"])
    assert "RESUMING" not in caplog.text and json.loads((out / "train_results.json").read_text())["train_loss"] > 0


@pytest.fixture(scope="module")
def tiny_glue_model(tmp_path_factory, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("glue_model")
    BertForMaskedLM(config).save_pretrained(path)
    return path


def test_no_pinned_memory_on_the_cpu(tmp_path):
    _, _, training_args = finetune_common.parse_args(run_glue.ARGUMENTS, ["--task_name", "sst2", "--output_dir", str(tmp_path), "--use_cpu"], "x")
    assert training_args.dataloader_pin_memory is False


# ------------------------------------------------------------------------- 6. a missing local path


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


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


# ---------------------------------------------------------------------------- 10. --fast_process cap


def test_fast_process_is_capped_at_the_cpus(tmp_path, corpus_file, tokenizer_dir, monkeypatch, caplog):
    monkeypatch.setattr(binarized_data, "available_cpus", lambda: 1)
    caplog.set_level(logging.WARNING)
    out = binarized_data.main(["--file_path", str(corpus_file), "--tokenizer_name", str(tokenizer_dir), "--dump_file",
                               str(tmp_path / "d"), "--fast_process", "--preprocessing_num_workers", "48",
                               "--max_parsing_example", "50"])
    assert out.is_file() and "--preprocessing_num_workers 48: only 1 CPU(s) available, using 1 processes" in caplog.text


def test_hub_and_datasets_warnings_print_once():
    import subprocess
    import sys

    code = ("import utils, datasets, huggingface_hub.utils.logging as hub\n"
            "hub.get_logger('huggingface_hub.x').warning('hub-said-this')\n"
            "datasets.utils.logging.get_logger('datasets.x').warning('datasets-said-this')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("hub-said-this") == 1 and proc.stderr.count("datasets-said-this") == 1, proc.stderr


@pytest.mark.parametrize("module", [extract, extract_distilbert, make_mapping])
def test_extract_and_mapping_help_explains_every_flag(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out.split("options:")[1]
    flags = {"--model_type": "family", "--dump_checkpoint": "model folder"} if module is not make_mapping else \
        {"--teacher": "config", "--alignment": "full"}
    for flag, words in flags.items():
        line = " ".join(out[out.index(flag):].split())  # argparse wraps the help text
        assert words in line[:300], (flag, line[:300])
