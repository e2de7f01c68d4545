"""Student initialisation: scripts/extract_distilbert.py, scripts/extract.py and training_configs/.

Teachers are tiny models built from configs and saved into tmp folders; nothing is downloaded.
Most runs call the scripts' `main(argv)` in-process (one import of torch/transformers); two runs
go through a subprocess to check the command line itself (exit status, message on stderr).
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import extract
import extract_distilbert
import make_mapping
import pytest
import torch
from conftest import ROOT
from helpers import train_argv

import causal_train
import extraction
from utils import CliError

CONFIGS = ROOT / "training_configs"
TINY = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, intermediate_size=37, max_position_embeddings=40)


def _perturb(model, seed: int):
    """Move every weight off its initial value, so LayerNorms and biases are not all 1s and 0s."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _bert(folder: Path, n_layers: int, seed: int, head: bool = True) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    torch.manual_seed(seed)
    config = BertConfig(num_hidden_layers=n_layers, **TINY)
    _perturb((BertForMaskedLM if head else BertModel)(config), seed).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForMaskedLM,
    )

    root = tmp_path_factory.mktemp("teachers")
    out = {
        "bert12": _bert(root / "bert12", 12, 0),
        "bert4": _bert(root / "bert4", 4, 1),
        "bert_no_head": _bert(root / "bert_no_head", 2, 2, head=False),
    }
    torch.manual_seed(3)
    roberta = RobertaConfig(
        num_hidden_layers=4, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5,
        **{**TINY, "max_position_embeddings": 42},
    )
    _perturb(RobertaForMaskedLM(roberta), 3).save_pretrained(root / "roberta4")
    out["roberta4"] = root / "roberta4"
    torch.manual_seed(4)
    gpt2 = GPT2Config(vocab_size=100, n_embd=32, n_layer=4, n_head=4, n_positions=40, bos_token_id=0, eos_token_id=0)
    _perturb(GPT2LMHeadModel(gpt2), 4).save_pretrained(root / "gpt2_4")
    out["gpt2_4"] = root / "gpt2_4"
    (root / "empty").mkdir()
    out["empty"] = root / "empty"
    return out


def _run(module, folder: Path, out: Path, *flags: str) -> tuple[dict, dict]:
    module.main(["--model_name", str(folder), "--dump_checkpoint", str(out), *flags])
    return torch.load(out), json.loads(Path(f"{out}.json").read_text())


def _teacher(cls_name: str, folder: Path):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(folder).eval()


def _distilbert(record: dict):
    from transformers import DistilBertConfig, DistilBertForMaskedLM

    fields = dict(record["student_config"])
    fields.pop("model_type")
    return DistilBertForMaskedLM(DistilBertConfig(**fields)).eval()


def _assert_bert_blocks_copied(student_sd: dict, teacher_sd: dict, teacher_layers: list[int]) -> None:
    for s, t in enumerate(teacher_layers):
        for student_name, teacher_name in extract_distilbert.BLOCK_MAP:
            for w in ("weight", "bias"):
                assert torch.equal(
                    student_sd[f"distilbert.transformer.layer.{s}.{student_name}.{w}"],
                    teacher_sd[f"bert.encoder.layer.{t}.{teacher_name}.{w}"],
                ), (s, t, student_name, w)


# --- layer choice -------------------------------------------------------------------------------


def test_default_choice_table_and_spread():
    choose = extraction.default_teacher_layers
    assert choose(12, 6) == ([0, 2, 4, 7, 9, 11], "table")
    assert choose(12, 3) == ([0, 2, 4], "table")
    assert choose(12, 9) == ([0, 2, 3, 4, 7, 8, 9, 10, 11], "table")
    assert choose(12, 12) == (list(range(12)), "spread")
    assert choose(24, 6) == ([0, 5, 9, 14, 18, 23], "spread")
    assert choose(4, 3) == ([0, 2, 3], "spread")
    assert choose(4, 1) == ([0], "spread")
    for n_teacher in range(1, 30):
        for n in range(1, n_teacher + 1):
            layers, _ = choose(n_teacher, n)
            assert len(layers) == n and layers[0] == 0 and all(b > a for a, b in zip(layers, layers[1:]))
            assert layers[-1] == (n_teacher - 1 if n > 1 else 0) or n_teacher == 12


# --- BERT -> DistilBERT -------------------------------------------------------------------------


def test_bert_default_layers_copied_exactly(teachers, tmp_path):
    sd, record = _run(extract_distilbert, teachers["bert12"], tmp_path / "s.pth")
    assert record["teacher"] == str(teachers["bert12"])
    assert record["teacher_layers"] == [0, 2, 4, 7, 9, 11] and record["num_layers"] == 6
    assert record["student_config"]["n_layers"] == 6 and record["student_config"]["sinusoidal_pos_embds"] is False

    student = _distilbert(record)
    result = student.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(
        f"{m}.{w}" for m in ("vocab_transform", "vocab_layer_norm") for w in ("weight", "bias")
    )

    t = _teacher("BertForMaskedLM", teachers["bert12"]).state_dict()
    assert torch.equal(sd["distilbert.embeddings.word_embeddings.weight"], t["bert.embeddings.word_embeddings.weight"])
    folded = t["bert.embeddings.position_embeddings.weight"] + t["bert.embeddings.token_type_embeddings.weight"][0]
    assert torch.equal(sd["distilbert.embeddings.position_embeddings.weight"], folded)
    for w in ("weight", "bias"):
        assert torch.equal(sd[f"distilbert.embeddings.LayerNorm.{w}"], t[f"bert.embeddings.LayerNorm.{w}"])
    _assert_bert_blocks_copied(sd, t, [0, 2, 4, 7, 9, 11])
    assert torch.equal(sd["vocab_projector.weight"], t["cls.predictions.decoder.weight"])
    assert torch.equal(sd["vocab_projector.bias"], t["cls.predictions.bias"])
    # What the student holds after loading is the extracted tensors, not its own initialisation.
    assert torch.equal(student.distilbert.transformer.layer[3].ffn.lin1.weight, t["bert.encoder.layer.7.intermediate.dense.weight"])


def test_bert_layers_flag(teachers, tmp_path):
    sd, record = _run(extract_distilbert, teachers["bert12"], tmp_path / "s.pth", "--layers", "1,5,10")
    assert record["teacher_layers"] == [1, 5, 10] and record["num_layers"] == 3 and record["layer_choice"] == "--layers"
    _assert_bert_blocks_copied(sd, _teacher("BertForMaskedLM", teachers["bert12"]).state_dict(), [1, 5, 10])
    assert "distilbert.transformer.layer.3.ffn.lin1.weight" not in sd


def test_bert_spread_rule_for_4_layer_teacher(teachers, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="causal_distill")
    sd, record = _run(extract_distilbert, teachers["bert4"], tmp_path / "s.pth", "--num_layers", "3")
    assert record["teacher_layers"] == [0, 2, 3] and record["layer_choice"] == "spread"
    assert "spread evenly: [0, 2, 3]" in caplog.text
    _assert_bert_blocks_copied(sd, _teacher("BertForMaskedLM", teachers["bert4"]).state_dict(), [0, 2, 3])


def test_bert_full_depth_student_reproduces_teacher(teachers, tmp_path):
    sd, record = _run(
        extract_distilbert, teachers["bert12"], tmp_path / "s.pth", "--layers", ",".join(map(str, range(12))), "--vocab_transform"
    )
    student = _distilbert(record)
    student.load_state_dict(sd, strict=True)
    teacher = _teacher("BertForMaskedLM", teachers["bert12"])
    ids = torch.randint(2, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
        assert torch.allclose(student(input_ids=ids).logits, expected, atol=1e-4)
        # The folded token-type row is what makes them agree.
        student.distilbert.embeddings.position_embeddings.weight -= teacher.bert.embeddings.token_type_embeddings.weight[0]
        assert not torch.allclose(student(input_ids=ids).logits, expected, atol=1e-4)


# --- RoBERTa and GPT-2 --------------------------------------------------------------------------


def _same_family_student(cls_name: str, folder: Path, n_layers: int):
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = n_layers
    return getattr(transformers, cls_name)(config).eval()


def test_roberta_subset_and_full_depth(teachers, tmp_path):
    teacher = _teacher("RobertaForMaskedLM", teachers["roberta4"])
    sd, record = _run(extract, teachers["roberta4"], tmp_path / "a.pth", "--model_type", "roberta", "--num_layers", "2")
    assert record["teacher_layers"] == [0, 3] and record["layer_choice"] == "spread"
    result = _same_family_student("RobertaForMaskedLM", teachers["roberta4"], 2).load_state_dict(sd, strict=False)
    assert not result.unexpected_keys
    assert sorted(result.missing_keys) == sorted(f"lm_head.{m}.{w}" for m in ("dense", "layer_norm") for w in ("weight", "bias"))
    t = teacher.state_dict()
    for key in ("attention.self.query.weight", "output.LayerNorm.bias"):
        assert torch.equal(sd[f"roberta.encoder.layer.1.{key}"], t[f"roberta.encoder.layer.3.{key}"])

    sd, record = _run(
        extract, teachers["roberta4"], tmp_path / "b.pth", "--model_type", "roberta", "--layers", "0,1,2,3", "--vocab_transform"
    )
    student = _same_family_student("RobertaForMaskedLM", teachers["roberta4"], 4)
    student.load_state_dict(sd, strict=True)
    ids = torch.randint(3, 100, (2, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-4)


def test_gpt2_subset_and_full_depth(teachers, tmp_path):
    teacher = _teacher("GPT2LMHeadModel", teachers["gpt2_4"])
    sd, record = _run(extract, teachers["gpt2_4"], tmp_path / "a.pth", "--model_type", "gpt2", "--layers", "1,2")
    _same_family_student("GPT2LMHeadModel", teachers["gpt2_4"], 2).load_state_dict(sd, strict=True)
    t = teacher.state_dict()
    assert torch.equal(sd["transformer.h.0.attn.c_attn.weight"], t["transformer.h.1.attn.c_attn.weight"])
    assert torch.equal(sd["transformer.h.1.mlp.c_proj.bias"], t["transformer.h.2.mlp.c_proj.bias"])

    sd, _ = _run(extract, teachers["gpt2_4"], tmp_path / "b.pth", "--model_type", "gpt2", "--num_layers", "4")
    student = _same_family_student("GPT2LMHeadModel", teachers["gpt2_4"], 4)
    student.load_state_dict(sd, strict=True)
    ids = torch.randint(0, 100, (2, 15), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(student(input_ids=ids).logits, teacher(input_ids=ids).logits, atol=1e-4)


# --- errors -------------------------------------------------------------------------------------

ERROR_CASES = [
    # (script, teacher, flags, culprit named in the message)
    ("distilbert", "missing", [], "--model_name"),
    ("distilbert", "empty", [], "--model_name"),
    ("distilbert", "gpt2_4", [], "'gpt2'"),
    ("distilbert", "bert_no_head", ["--num_layers", "1"], "lacks"),
    ("distilbert", "bert4", ["--num_layers", "5"], "--num_layers 5"),
    ("distilbert", "bert4", ["--num_layers", "0"], "--num_layers 0"),
    ("distilbert", "bert4", ["--layers", "0,4"], "--layers 0,4"),
    ("distilbert", "bert4", ["--layers", "2,1"], "strictly increasing"),
    ("distilbert", "bert4", ["--layers", "1,1"], "strictly increasing"),
    ("distilbert", "bert4", ["--layers", "a,b"], "--layers 'a,b'"),
    ("distilbert", "bert4", ["--layers", "0,1", "--num_layers", "3"], "--num_layers 3"),
    ("extract", "bert4", ["--model_type", "roberta"], "'bert'"),
    ("extract", "gpt2_4", ["--model_type", "gpt2", "--layers", "0,9"], "--layers 0,9"),
]


@pytest.mark.parametrize("script,teacher,flags,culprit", ERROR_CASES)
def test_errors_name_the_culprit_and_write_nothing(teachers, tmp_path, script, teacher, flags, culprit):
    module = extract_distilbert if script == "distilbert" else extract
    folder = teachers.get(teacher, tmp_path / "no_such_model")
    out_dir = tmp_path / "out"
    with pytest.raises(CliError, match=re.escape(culprit)):
        module.main(["--model_name", str(folder), "--dump_checkpoint", str(out_dir / "s.pth"), *flags])
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_dump_checkpoint_that_is_a_folder(teachers, tmp_path):
    (tmp_path / "notes.txt").write_text("not an extraction")
    with pytest.raises(CliError, match="--dump_checkpoint"):
        extract_distilbert.main(["--model_name", str(teachers["bert4"]), "--dump_checkpoint", str(tmp_path)])
    (tmp_path / "s.pth").mkdir()
    with pytest.raises(CliError, match="--dump_checkpoint"):
        extract_distilbert.main(["--model_name", str(teachers["bert4"]), "--dump_checkpoint", str(tmp_path / "s.pth")])


def test_unknown_model_type_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        extract_distilbert.main(["--model_type", "roberta", "--dump_checkpoint", str(tmp_path / "s.pth")])
    assert err.value.code == 2 and "--model_type" in capsys.readouterr().err


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_error_exit_status(teachers, tmp_path):
    out = tmp_path / "s.pth"
    proc = _cli("extract_distilbert.py", "--model_name", str(teachers["bert4"]), "--dump_checkpoint", str(out), "--layers", "0,7")
    assert proc.returncode == 2
    assert "--layers 0,7" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not Path(f"{out}.json").exists()


def test_cli_success(teachers, tmp_path):
    out = tmp_path / "sub" / "s.pth"
    proc = _cli("extract.py", "--model_type", "gpt2", "--model_name", str(teachers["gpt2_4"]), "--dump_checkpoint", str(out), "--num_layers", "2")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(Path(f"{out}.json").read_text())
    assert record["teacher_layers"] == [0, 3] and record["num_layers"] == 2
    assert len(torch.load(out)) > 0
    assert "[0, 3]" in proc.stderr


# --- shipped configs ----------------------------------------------------------------------------

CONFIG_FILES = {
    # file: (model_type, n_layers, vocab_size)
    "distilbert-base-uncased.json": ("distilbert", 6, 30522),
    "distilbert-base-uncased-large.json": ("distilbert", 9, 30522),
    "distilbert-base-uncased-small.json": ("distilbert", 3, 30522),
    "distilbert-base-uncased-tiny.json": ("distilbert", 1, 30522),
    "distilbert-base-cased.json": ("distilbert", 6, 28996),
    "distilbert-base-multilingual-cased.json": ("distilbert", 6, 119547),
    "distilroberta-base.json": ("roberta", 6, 50265),
    "distilgpt2.json": ("gpt2", 6, 50257),
}


def test_every_shipped_config_builds_its_model():
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        BertConfig,
    )

    assert {p.name for p in CONFIGS.glob("*.json")} == set(CONFIG_FILES)
    bert_base = extract_distilbert.distilbert_config_fields(BertConfig(), 6)
    for name, (model_type, n_layers, vocab) in CONFIG_FILES.items():
        fields = json.loads((CONFIGS / name).read_text())
        assert fields.pop("model_type") == model_type, name
        config = AutoConfig.for_model(model_type, **fields)
        assert (config.num_hidden_layers, config.vocab_size) == (n_layers, vocab), name
        auto = AutoModelForCausalLM if model_type == "gpt2" else AutoModelForMaskedLM
        with torch.device("meta"):  # builds every module without allocating the weights
            model = auto.from_config(config)
        assert len(model.base_model.transformer.layer if model_type == "distilbert" else
                   model.base_model.encoder.layer if model_type == "roberta" else model.base_model.h) == n_layers
        if model_type == "distilbert":
            assert config.sinusoidal_pos_embds is False, name
            # What extraction from a BERT-base teacher produces matches the shipped architecture.
            for key in ("dim", "n_heads", "hidden_dim", "max_position_embeddings", "activation"):
                assert getattr(config, key) == bert_base[key], (name, key)


# --- neuron mappings ----------------------------------------------------------------------------

_SPAN = r"(\d+|\[\d+:\d+\])"
_NAME = re.compile(rf"^\$L:{_SPAN}\$H:{_SPAN}\$\[(\d+):(\d+)\]$")
NM_FILES = {
    "single_middle_layer_6.nm": 6,
    "single_middle_layer_9.nm": 9,
    "multiple_single_multilayer_layer_3.nm": 3,
    "multiple_single_multilayer_layer_6.nm": 6,
    "multiple_single_multilayer_layer_9.nm": 9,
    "single_middle_late.nm": 3,
    "single_multilayer.nm": 3,
    "double_middle.nm": 3,
    "single_interleave.nm": 3,
    "single_middle_headwise.nm": 3,
    "single_multilayer_headwise.nm": 3,
    "single_multilayer_late.nm": 3,
    "multiple_single_middle_late.nm": 3,
    "multiple_single_middle_late_layer_6.nm": 6,
    "multiple_single_multilayer_late.nm": 3,
}


def _span(text: str) -> range:
    if text.startswith("["):
        a, b = map(int, text[1:-1].split(":"))
        return range(a, b)
    return range(int(text), int(text) + 1)


def _check_name(name: str, n_layers: int, n_heads: int = 12, head_dim: int = 64) -> None:
    m = _NAME.match(name)
    assert m, name
    layers, heads, d0, d1 = _span(m[1]), _span(m[2]), int(m[3]), int(m[4])
    assert len(layers) and 0 <= layers.start and layers.stop <= n_layers, (name, n_layers)
    assert len(heads) and 0 <= heads.start and heads.stop <= n_heads, name
    assert 0 <= d0 < d1 <= head_dim, name


def test_neuron_mappings_are_in_range_and_documented():
    readme = (CONFIGS / "README.md").read_text()
    assert {p.name for p in CONFIGS.glob("*.nm")} == set(NM_FILES)
    for name, student_depth in NM_FILES.items():
        assert f"`{name}`" in readme, name
        mappings = json.loads((CONFIGS / name).read_text())["interchange_variable_mappings"]
        assert mappings, name
        for entry in mappings:
            assert set(entry) == {"teacher_variable_names", "student_variable_names"}, name
            for var in entry["teacher_variable_names"]:
                _check_name(var, n_layers=12)
            for var in entry["student_variable_names"]:
                _check_name(var, n_layers=student_depth)
                if not re.search(r"_layer_\d+\.nm$", name):
                    _check_name(var, n_layers=6)  # the unsuffixed files also fit the 6-layer student


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
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        RobertaConfig,
        RobertaForMaskedLM,
    )

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
