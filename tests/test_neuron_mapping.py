"""`.nm` parsing: the site semantics, range expansion, and a clear error for every malformed input."""
import json
from pathlib import Path

import pytest

from neuron_mapping import ModelShape, load_neuron_mapping, parse_variable_name
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
