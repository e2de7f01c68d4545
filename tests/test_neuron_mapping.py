"""`.nm` parsing: the site semantics, range expansion, and a clear error for every malformed input."""
from __future__ import annotations

import json
from pathlib import Path

import extract_distilbert
import make_mapping
import pytest
from conftest import ROOT
from helpers import train_argv

import causal_train
from neuron_mapping import ModelShape, load_neuron_mapping, parse_variable_name
from pipelines.quickstart import distill as quickstart_distill
from utils import CliError

TEACHER = ModelShape(n_layers=12, hidden_size=768, n_heads=12)
STUDENTS = {3: ModelShape(3, 768, 12), 6: ModelShape(6, 768, 12), 9: ModelShape(9, 768, 12)}
CONFIGS = Path(__file__).resolve().parent.parent / "training_configs"


def test_stop_index_is_head_offset_plus_d1():
    # The original computed stop = start + d1: for head 1, dims [8:16] it wrote 72..136 instead of 72..80.
    sites = parse_variable_name("$L:2$H:1$[8:16]", ModelShape(4, 128, 2))
    assert sites == {2: tuple(range(64 + 8, 64 + 16))}


def test_ranges_expand_to_every_layer_and_head():
    sites = parse_variable_name("$L:[1:3]$H:[0:2]$[0:2]", ModelShape(4, 16, 4))
    assert sites == {1: (0, 1, 4, 5), 2: (0, 1, 4, 5)}


def _write(tmp_path, obj, raw=None):
    path = tmp_path / "m.nm"
    path.write_text(raw if raw is not None else json.dumps(obj))
    return path


def _entry(t, s):
    return {"interchange_variable_mappings": [{"teacher_variable_names": t, "student_variable_names": s}]}


def test_entries_merge_variables_per_layer(tmp_path):
    path = _write(tmp_path, _entry(["$L:6$H:0$[0:2]", "$L:6$H:1$[0:2]"], ["$L:3$H:[0:12]$[0:64]"]))
    (entry,) = load_neuron_mapping(path, TEACHER, STUDENTS[6])
    assert entry.teacher == {6: (0, 1, 64, 65)}
    assert entry.student == {3: tuple(range(768))}


@pytest.mark.parametrize(
    "content, fragment",
    [
        (None, "not valid JSON"),
        ({"mappings": []}, "interchange_variable_mappings"),
        ({"interchange_variable_mappings": []}, "is empty"),
        (_entry([], ["$L:0$H:0$[0:1]"]), "teacher_variable_names"),
        (_entry(["$L:0$H:0$[0:1]"], None), "student_variable_names"),
        (_entry(["L:0$H:0$[0:1]"], ["$L:0$H:0$[0:1]"]), "malformed variable name"),
        (_entry(["$L:12$H:0$[0:1]"], ["$L:0$H:0$[0:1]"]), "layer 12"),
        (_entry(["$L:0$H:0$[0:1]"], ["$L:[2:7]$H:0$[0:1]"]), "layer 6"),
        (_entry(["$L:0$H:12$[0:1]"], ["$L:0$H:0$[0:1]"]), "head 12"),
        (_entry(["$L:0$H:0$[0:65]"], ["$L:0$H:0$[0:1]"]), "dimension range [0:65]"),
        (_entry(["$L:0$H:0$[4:4]"], ["$L:0$H:0$[0:1]"]), "dimension range [4:4]"),
        (_entry(["$L:[3:3]$H:0$[0:4]"], ["$L:0$H:0$[0:1]"]), "empty layer range"),
        (_entry([7], ["$L:0$H:0$[0:1]"]), "must be a string"),
    ],
)
def test_malformed_mappings_name_file_entry_and_variable(tmp_path, content, fragment):
    path = _write(tmp_path, content, raw="{not json" if content is None else None)
    with pytest.raises(CliError) as err:
        load_neuron_mapping(path, TEACHER, STUDENTS[6])
    msg = str(err.value)
    assert fragment in msg and str(path) in msg
    if fragment.startswith(("malformed", "layer", "head", "dimension", "empty", "must be")):
        assert "entry 0" in msg and "variable" in msg


def test_missing_file(tmp_path):
    with pytest.raises(CliError, match="does not exist"):
        load_neuron_mapping(tmp_path / "none.nm", TEACHER, STUDENTS[6])


def _student_depth(name: str) -> int:
    for depth in (3, 6, 9):
        if f"layer_{depth}" in name:
            return depth
    return 6


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.nm")), ids=lambda p: p.name)
def test_shipped_mappings_parse(path):
    entries = load_neuron_mapping(path, TEACHER, STUDENTS[_student_depth(path.name)])
    assert entries and all(e.teacher and e.student for e in entries)


def test_some_mappings_are_shipped():
    assert len(list(CONFIGS.glob("*.nm"))) >= 10


@pytest.mark.parametrize("output", ["student.pth", "student_folder"])
def test_make_mapping_writes_the_quickstarts_alignment_from_the_extraction_record(distill_setup, tmp_path, output):
    student = tmp_path / output
    extract_distilbert.main(["--model_name", str(distill_setup["teacher"]), "--dump_checkpoint", str(student),
                             "--layers", "1,3", "--vocab_transform"])
    record = json.loads((student / "extraction.json" if student.is_dir() else tmp_path / "student.pth.json").read_text())
    assert record["teacher_layers"] == [1, 3]
    out = tmp_path / "extracted.nm"
    make_mapping.main(["--teacher", str(distill_setup["teacher"]), "--student", str(student), "--alignment", "extracted",
                       "--output", str(out)])
    heads, hidden = 4, 32  # the distill set-up's width
    assert json.loads(out.read_text()) == quickstart_distill.neuron_mapping([1, 3], heads, hidden // heads)
    # and it is a mapping causal_train.py takes for this teacher and student
    causal_train.main(train_argv(distill_setup, tmp_path / "run", "--max_steps", "1", "--neuron_mapping", str(out),
                                 "--student_config", str(student if student.is_dir() else tmp_path / "student.config.json"),
                                 "--student_pretrained_weights", str(student)))


def test_make_mapping_extracted_needs_the_record(distill_setup, tmp_path):
    with pytest.raises(CliError, match="--alignment extracted needs the extraction record of --student .*student.json"):
        make_mapping.main(["--teacher", str(distill_setup["teacher"]), "--student", str(distill_setup["student_config"]),
                           "--alignment", "extracted", "--output", str(tmp_path / "m.nm")])
    assert not (tmp_path / "m.nm").exists()


def test_a_shipped_mapping_that_does_not_fit_points_to_make_mapping():
    with pytest.raises(CliError) as err:
        load_neuron_mapping(ROOT / "training_configs" / "single_middle_layer_6.nm", ModelShape(4, 32, 4),
                            ModelShape(2, 32, 4))
    assert "single_middle_layer_6.nm, entry 0, teacher variable" in str(err.value)
    assert "write one for these models with scripts/make_mapping.py" in str(err.value)


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
