"""The causal-LM quickstart (`scripts/quickstart.py --family llama`) at its smallest size."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

import quickstart
from pipelines.quickstart import clm as quickstart_clm
from conftest import ROOT
from helpers import assert_same_numbers, quickstart_twice, run_together


FAST = ("--family", "llama", "--preset", "test", "--seeds", "1", "--jobs", "2", "--no_ablation")
MAIN = [a.name for a in quickstart_clm.ClmQuickstart.arms.values() if a.main]
ABLATION = [a.name for a in quickstart_clm.ClmQuickstart.arms.values()  # (the test preset's subset)
            if not a.main and a.name in quickstart.PRESETS["test"].ablation_arms]


@pytest.fixture(scope="module")
def two_llama_runs(tmp_path_factory):
    """The causal-LM quickstart's test preset, the same command twice from nothing, at the same time:
    [(output folder, completed process)] * 2. The first is every test's run."""
    return quickstart_twice(tmp_path_factory.mktemp("llama"), list(FAST))


@pytest.fixture(scope="module")
def llama_run(two_llama_runs):
    return two_llama_runs[0]


@pytest.mark.e2e
def test_same_command_same_numbers(two_llama_runs):
    """A second run of the same command, from nothing, gives bitwise the same corpus, tokenizer and numbers."""
    (out, _), (second, _) = two_llama_runs
    assert_same_numbers(out, second, MAIN)


@pytest.mark.e2e
def test_llama_quickstart_runs_end_to_end_and_reports(llama_run):
    out, proc = llama_run
    for k in range(1, quickstart_clm.N_STAGES + 1):
        assert f"[stage {k}/{quickstart_clm.N_STAGES}]" in proc.stdout
    assert " - INFO - " not in proc.stdout + proc.stderr
    teacher = json.loads((out / "teacher" / "config.json").read_text())
    student = json.loads((out / "student_init" / "student_config.json").read_text())
    assert teacher["model_type"] == student["model_type"] == "llama"
    assert teacher["num_key_value_heads"] < teacher["num_attention_heads"]  # grouped-query attention
    assert student["num_hidden_layers"] == quickstart.PRESETS["test"].student_layers
    commands = (out / "commands.sh").read_text()
    assert "run_clm.py" in commands and "--tokenizer_type llama" in commands and "run_mlm.py" not in commands
    assert "count_step_flops.py" in commands and "run_iia.py" in commands
    summary = json.loads((out / "summary.json").read_text())
    assert summary["family"] == "llama"
    values = [summary["teacher"]["perplexity"], summary["student_init"]["perplexity"]["1"]] + \
        [v for o in MAIN for v in summary[o]["perplexity"].values()]
    assert all(math.isfinite(v) and 1 < v < summary["vocab_size"] * 2 for v in values), values
    # parity with the BERT quickstart: IIA of every main arm and the references, the equal-compute arm
    reported = {"student_init": summary["student_init"]["iia"]["1"],
                "random_student": summary["random_student"]["iia"]["1"],
                **{f"{o}_seed1": summary[o]["iia"]["seed 1"] for o in MAIN}}
    for name, value in reported.items():
        mapping = json.loads((out / "iia" / name / "iia_results.json").read_text())["mapping"]
        assert mapping["overall"]["iia"]["value"] == value and 0.0 <= value <= 1.0
    assert summary["standard_eqc"]["steps"] == round(summary["diito"]["steps"] * summary["flops_per_step"]["ratio"])
    assert summary["flops_per_step"]["ratio"] > 1.2
    report = (out / "report.md").read_text()
    assert "teacher (Llama)" in report and summary["verdict"] in report
    assert "equal compute" in summary["verdict"] and len(summary["verdict"].splitlines()) == 3
    assert "student at initialisation (no distillation)" in report and "random student of the same shape" in report
    for png in ("heldout_perplexity.png", "training_losses.png", "iia_heatmaps.png", "curves.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every model is evaluated on the same fixed blocks
    samples = {json.loads(p.read_text())["eval_samples"] for p in (out / "eval").glob("*/eval_results.json")}
    assert len(samples) == 1
    # the controls ran with the family too: source-KD with --source_kd, the misaligned one with its mapping
    assert "--source_kd" in commands and "misaligned.nm" in commands


@pytest.mark.e2e
def test_the_ablation_adds_a_divergence_and_on_policy_rows(llama_run):
    """Without --no_ablation the causal-LM quickstart adds only the ablation's runs; among them the default
    objective with the generalised JSD and with half the batches on-policy, each a row of the ablation table."""
    out, _ = llama_run
    before = (out / "commands.sh").read_text().split("\npython ")
    (proc,) = run_together(ROOT / "scripts" / "quickstart.py",
                           [*[a for a in FAST if a != "--no_ablation"], "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new = (out / "commands.sh").read_text().split("\npython ")[len(before):]
    trained = [c for c in new if c.startswith("causal_train.py")]
    assert len(trained) == len(ABLATION) and all("--force" in c for c in trained)
    assert sum("--divergence jsd --jsd_beta 0.5" in c for c in trained) == 1
    assert sum("--on_policy_fraction 0.5" in c for c in trained) == 1
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    for arm in ("abl_jsd", "abl_on_policy"):
        assert summary[arm]["main"] is False and math.isfinite(summary[arm]["perplexity"]["seed 1"])
        assert f"| {quickstart_clm.ClmQuickstart.arms[arm].label} |" in report


def test_family_flag_is_checked():
    with pytest.raises(SystemExit) as exit_info:
        quickstart.parse_args(["--family", "t5"])
    assert exit_info.value.code == 2
    assert quickstart_clm.config_overrides("llama", quickstart.PRESETS["small"]).count("num_key_value_heads=2") == 1


def test_causal_lm_presets_differ_from_bert_only_in_teacher_fine_tuning_and_iia_sizes():
    # A causal LM memorises the small corpus in far fewer steps than the masked LM the BERT presets
    # were sized for; the causal-LM quickstart (and only it) trains its teacher for its own count,
    # `small` and `study` fine-tune for fewer steps (a causal-LM fine-tune step costs about twice a BERT one),
    # and `study` measures IIA on fewer pairs (to fit its time).
    for name, bert in quickstart.PRESETS.items():
        clm = quickstart_clm.checked_preset(name, "llama")
        assert clm.teacher_steps == quickstart_clm.TEACHER_STEPS[name]
        assert replace(clm, teacher_steps=bert.teacher_steps, downstream_steps=bert.downstream_steps,
                       iia_pairs=bert.iia_pairs) == bert
    assert quickstart_clm.checked_preset("study", "llama").downstream_steps == 40
    assert quickstart_clm.checked_preset("small", "llama").downstream_steps == 40
    assert quickstart_clm.checked_preset("test", "llama").downstream_steps == quickstart.PRESETS["test"].downstream_steps
    assert quickstart_clm.checked_preset("study", "llama").iia_pairs == 128
    assert quickstart_clm.checked_preset("small", "llama").iia_pairs == quickstart.PRESETS["small"].iia_pairs


def test_causal_lm_quickstart_on_user_text_keeps_every_document(tmp_path, monkeypatch):
    """--text drops the preset's document cap; the causal-LM path must keep that, not reload the preset."""
    from pipelines.quickstart import clm as quickstart_clm

    seen = {}

    class Capture:
        def __init__(self, args, preset, user_docs):
            seen["preset"], seen["docs"] = preset, user_docs

        def run(self):
            return {}

    monkeypatch.setattr(quickstart_clm, "ClmQuickstart", Capture)
    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(f"Document number {i} says something about topic {i % 7}." for i in range(40)))
    quickstart.main(["--family", "llama", "--preset", "test", "--text", str(text), "--out", str(tmp_path / "out")])
    assert quickstart_clm.preset_for("test").max_documents  # the test preset has a cap ...
    assert seen["preset"].max_documents is None  # ... that user text removes
    assert seen["preset"].teacher_steps == quickstart_clm.preset_for("test").teacher_steps
