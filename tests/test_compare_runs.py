"""scripts/compare_runs.py and pipelines/quickstart/compare.py: what moved between two quickstart runs."""
import copy
import json
import math
import subprocess
import sys

import pytest

from pipelines.quickstart import compare as cmp
from utils import REPO_ROOT


def summary():
    return {
        "preset": "small",
        "verdict": "1. Distillation: perplexity better (-18.25 [-21.59, -14.92]; p = 0.0018, Holm 0.0052, 3 seeds)\n"
                   "2. DIITO: no clear difference (+0.61; p = 0.587, Holm 1, 3 seeds)",
        "environment": {"packages": {"torch": "2.13.0"}, "load": 1.9, "threads": 1},
        "teacher": {"perplexity": 429.135, "train_seconds": 143.0, "steps": 1200},
        "standard": {"perplexity": {"seed 1": 424.42, "seed 2": 423.95}, "train_seconds": {"seed 1": 20.0}},
        "comparisons": {
            "standard|perplexity": {"diff": -18.25, "ci95": [-21.59, -14.92], "p": 0.0018, "p_holm": 0.0052,
                                    "spread": 1.4, "result": "better"},
            "diito|perplexity": {"diff": 0.61, "ci95": [-3.47, 4.69], "p": 0.587, "p_holm": 1.0, "spread": 4.1,
                                 "result": "no clear difference"},
        },
        "corpus": {"versions": {"torch": "2.13.0+cpu"}, "train_documents": 18743},
    }


def test_figures_are_the_results_not_the_clocks_or_the_machine():
    found = cmp.figures(summary())
    assert found["teacher/perplexity"] == 429.135
    assert found["standard/perplexity/seed 2"] == 423.95
    assert found["comparisons/standard|perplexity/ci95/1"] == -14.92
    assert found["corpus/train_documents"] == 18743
    assert not [k for k in found if "seconds" in k or k.startswith("environment/")]
    assert cmp.kind_of("standard/perplexity/seed 2") == "perplexity"
    assert cmp.kind_of("comparisons/standard|perplexity/ci95/1") == "ci95"
    assert cmp.kind_of("diito/perplexity/teacher 3 seed 1") == "perplexity"
    assert cmp.kind_of("teacher/per_teacher/1") == "per_teacher"


def test_the_same_run_compares_equal_throughout():
    result = cmp.compare(summary(), summary(), {"a.safetensors": "x"}, {"a.safetensors": "x"})
    assert result.equal == result.common == len(cmp.figures(summary()))
    assert not result.moved and not result.flipped and not result.verdict_changes
    assert (result.weights_common, result.weights_equal) == (1, 1)


def test_a_moved_figure_is_counted_with_its_relative_difference():
    other = summary()
    other["standard"]["perplexity"]["seed 1"] = 424.50
    other["train_seconds_are_clocks"] = 5  # a clock is never a figure
    result = cmp.compare(summary(), other, {"a": "x", "b": "y"}, {"a": "x", "b": "z", "c": "w"})
    assert result.equal == result.common - 1
    assert result.moved == {"perplexity": 1}
    rel, path = result.largest["perplexity"]
    assert path == "standard/perplexity/seed 1"
    assert rel == pytest.approx((424.50 - 424.42) / 424.50)
    assert (result.weights_common, result.weights_equal) == (2, 1)


def test_a_verdict_the_report_changed_is_a_flip_and_numbers_alone_are_not():
    other = summary()
    other["comparisons"]["standard|perplexity"].update(p_holm=0.051, result="no clear difference")
    # significant now, but within the seeds' spread: the report still says "no clear difference", no flip
    other["comparisons"]["diito|perplexity"]["p_holm"] = 0.01
    other["verdict"] = other["verdict"].replace("-18.25", "-18.31").replace("Holm 1,", "Holm 0.244,")  # numbers only
    result = cmp.compare(summary(), other)
    assert result.flipped == ["standard|perplexity"]
    assert result.verdict_changes == []
    other["verdict"] = other["verdict"].replace("perplexity better", "perplexity no clear difference")
    changed = cmp.compare(summary(), other).verdict_changes
    assert len(changed) == 1 and "no clear difference" in changed[0][1]


def test_relative_difference_edges():
    assert cmp.relative_difference(2.0, 2.0) == 0.0
    assert cmp.relative_difference(math.nan, math.nan) == 0.0
    assert cmp.relative_difference(1.0, math.inf) == math.inf
    assert cmp.relative_difference(-1.0, 1.0) == 2.0


def _run_folder(path, data, weights: bytes):
    (path / "teacher").mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(data))
    (path / "teacher" / "model.safetensors").write_bytes(weights)
    return path


def test_the_command_compares_folders_and_digests_travel_in_place_of_weights(tmp_path):
    a = _run_folder(tmp_path / "a", summary(), b"same")
    moved = copy.deepcopy(summary())
    moved["teacher"]["perplexity"] = 429.2
    b = _run_folder(tmp_path / "b", moved, b"other")
    script = str(REPO_ROOT / "scripts" / "compare_runs.py")
    run = subprocess.run([sys.executable, script, str(a), str(b)], check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr
    assert f"bit for bit equal: {len(cmp.figures(summary())) - 1}" in run.stdout
    assert "weight files in both: 1; byte for byte equal: 0" in run.stdout
    # b's weights replaced by the digests of a's: the comparison now finds them equal
    (b / "teacher" / "model.safetensors").unlink()
    (b / "weights.sha256.json").write_text(json.dumps(cmp.weight_digests(a)))
    run = subprocess.run([sys.executable, script, str(a), str(b)], check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    assert "weight files in both: 1; byte for byte equal: 1" in run.stdout
    written = subprocess.run([sys.executable, script, "--write_digests", str(a)], check=False, capture_output=True, text=True,
                             cwd=REPO_ROOT)
    assert written.returncode == 0
    assert json.loads((a / "weights.sha256.json").read_text()) == cmp.weight_digests(a)


def test_a_folder_without_a_summary_is_named_and_exits_2(tmp_path):
    (tmp_path / "half").mkdir()
    run = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "compare_runs.py"), str(tmp_path / "half"),
                          str(tmp_path)], check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    assert run.returncode == 2
    assert "half has no summary.json" in run.stderr
    assert "Traceback" not in run.stderr


def test_differing_files_are_listed_earliest_stage_first(tmp_path):
    """Where two runs parted: the tokenizer before the teachers, the teachers before the students."""
    a = {"students/diito_seed1/model.safetensors": "1", "teacher_t2/model.safetensors": "2",
         "tokenizer/tokenizer.json": "3", "student_init/model/model.safetensors": "4", "random_student/model.safetensors": "5"}
    b = {k: v + "x" for k, v in a.items()} | {"random_student/model.safetensors": "5"}
    result = cmp.compare(summary(), summary(), a, b)
    assert result.weights_differing == ["tokenizer/tokenizer.json", "teacher_t2/model.safetensors",
                                        "student_init/model/model.safetensors", "students/diito_seed1/model.safetensors"]
    assert "differing, earliest stage first: `tokenizer/tokenizer.json`, `teacher_t2" in "\n".join(result.lines())
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "model.safetensors").write_bytes(b"w")
    assert list(cmp.weight_digests(tmp_path)) == ["tokenizer/tokenizer.json", "teacher/model.safetensors"]


def test_two_experiments_are_flagged_before_their_figures():
    other = copy.deepcopy(summary()) | {"family": "llama"}
    lines = cmp.compare(summary() | {"family": "bert"}, other).lines()
    assert lines[0].startswith("- **not the same experiment** (family: bert / llama)")
    assert not cmp.compare(summary(), copy.deepcopy(summary())).setup_differs
