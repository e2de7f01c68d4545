"""The offline quickstart: the whole pipeline at its smallest size, resumption, and bad input."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import pytest
import quickstart
from conftest import ROOT
from helpers import assert_same_numbers, quickstart_twice

import doc_corpus
from pipelines.quickstart import mlm as quickstart_mlm
from pipelines.quickstart.arms import build_arms
from pipelines.quickstart import pipeline as quickstart_pipeline
from pipelines.quickstart.pipeline import QUICKSTART_ENV
from utils import CliError

SCRIPT = ROOT / "scripts" / "quickstart.py"
SEEDS = 1  # the smallest run; the ± of several seeds is tested on the report function
# The end-to-end runs skip the ablation (about half the runs); test_ablation_stage_adds_only_its_runs adds it.
FAST = ("--preset", "test", "--seeds", str(SEEDS), "--jobs", "2", "--no_ablation")
# the test preset's main arms, the low-resource pair included
MAIN = [a.name for a in build_arms(True, quickstart_mlm.DEFAULT_OBJECTIVE, quickstart_mlm.DEFAULT_SMOOTHING,
                                   low_resource=quickstart.PRESETS["test"].low_resource).values() if a.main]
ABLATION = [a.name for a in quickstart_mlm.MlmQuickstart.arms.values()
            if not a.main and a.name in quickstart.PRESETS["test"].ablation_arms]  # the test preset's subset


def run_quickstart(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, **QUICKSTART_ENV)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def prose_lines(n: int) -> list[str]:
    return [f"Document number {i} says that the quick brown fox jumps over the lazy dog {i} times." for i in range(n)]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The quickstart at its smallest size, the same command twice from nothing, at the same time, once for the
    module: [(output folder, completed process)] * 2. The first is every test's run; the second is compared with
    it by test_same_command_same_numbers."""
    return quickstart_twice(tmp_path_factory.mktemp("quickstart"), list(FAST))


@pytest.fixture(scope="module")
def test_run(two_runs):
    """The quickstart at its smallest size: (output folder, completed process)."""
    return two_runs[0]


@pytest.mark.e2e
def test_every_stage_announced_and_its_output_written(test_run):
    out, proc = test_run
    for k in range(1, quickstart_mlm.N_STAGES + 1):
        assert f"[stage {k}/{quickstart_mlm.N_STAGES}]" in proc.stdout
    runs = [f"{objective}_seed{seed}" for seed in range(1, SEEDS + 1) for objective in MAIN]
    expected = [
        "corpus/train.txt", "corpus/validation.txt", "corpus/test.txt", "tokenizer/tokenizer.json",
        "teacher/model.safetensors", "teacher/config.json", "teacher/trainer_state.json",
        "data/token_counts.pickle", "student_init/student_init.pth", "student_init/student_config.json",
        "student_init/diito.nm", "student_init/misaligned.nm", "student_init/model/model.safetensors",
        "random_student/model.safetensors", "eval/teacher/eval_results.json", "eval/student_init/eval_results.json",
        "eval_validation/student_init/eval_results.json", "eval/random_student/eval_results.json",
        "iia/student_init/iia_results.json", "iia_misaligned/student_init/iia_results.json",
        "iia/random_student/iia_results.json", "report.md", "summary.json",
        "plots/heldout_perplexity.png", "plots/training_losses.png", "plots/iia_heatmaps.png", "plots/curves.png",
        "commands.sh", "flops/standard.json", "flops/diito.json", "flops/ctl_source_kd.json",
    ]
    expected += [f"eval/{r}/eval_results.json" for r in runs] + [f"iia/{r}/iia_results.json" for r in runs]
    missing = [p for p in expected if not (out / p).is_file()]
    assert not missing
    assert not (out / "students" / f"abl_ce_seed{SEEDS}").exists()  # --no_ablation
    assert not (out / "plots" / "ablation.png").exists()
    assert len(list((out / "data").glob("*.bin"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    # the first teacher's standard and DIITO runs are the tuning runs at the chosen rate and weight (the same
    # command): copied, not trained twice
    tuned = [f"tune_lr{i}_seed{s}" for i in (1, 2) for s in range(1, SEEDS + 1)] + \
        [f"tune_w{j}_seed{s}" for j in (1, 2) for s in range(1, SEEDS + 1)]
    for run in [*tuned, *runs]:
        assert (out / "students" / run / "model.safetensors").is_file(), run
        assert list((out / "students" / run / "log" / "train").glob("events.out.tfevents.*")), run
        assert json.loads((out / "students" / run / ".done").read_text())["key"], run
    for arm, tune in (("standard", "tune_lr"), ("diito", "tune_w")):
        same = json.loads((out / "students" / f"{arm}_seed1" / ".done").read_text())["same_as"]
        assert same.startswith(tune) and (out / "students" / f"{arm}_seed1" / "model.safetensors").read_bytes() == \
            (out / "students" / same / "model.safetensors").read_bytes()
    assert "same_as" not in json.loads((out / "students" / "ctl_weight_seed1" / ".done").read_text())
    trained = [line for line in (out / "commands.sh").read_text().splitlines() if line.startswith("python causal_train.py")]
    assert len(trained) == len(tuned) + len(runs) - 2 * SEEDS
    lr = quickstart.PRESETS["test"].tune_lrs.index(summary["tuning"]["lr"]) + 1
    assert summary["standard"]["learning_rate"] == summary["tuning"]["lr"]
    assert summary["standard"]["perplexity"] != summary[f"tune_lr{lr}"]["perplexity"]  # test, not validation
    for folder in ["corpus", "tokenizer", "teacher", "data", "student_init", "random_student", "flops", "plots"] + \
            [f"eval/{r}" for r in runs] + ["eval/teacher"] + [f"iia/{r}" for r in runs]:
        assert json.loads((out / folder / ".done").read_text())["key"], folder
    for png in (out / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_downstream_stage_fine_tunes_every_model_on_its_corpus_tasks(test_run):
    """Stage 9: the teachers, references and every main run fine-tuned with run_glue.py on the tasks the corpus
    poses, scored on their test part, paired by seed and in the report's comparisons."""
    out, proc = test_run
    summary = json.loads((out / "summary.json").read_text())
    tasks = json.loads((out / "tasks" / ".done").read_text())
    # the test preset's corpus (its first 400 paragraphs, all the standard library's) cannot pose `source`
    assert tasks["tasks"] == ["replaced", "same_document"] and tasks["skipped"] == ["source"]
    assert "not posed by this corpus: source" in proc.stdout
    assert summary["downstream"]["same_document"]["balance"]["test"]["majority_accuracy"] == 0.5
    commands = (out / "commands.sh").read_text()
    assert f"run_glue.py --model_name_or_path {out}/students/diito_seed1 " in commands
    assert f"run_ner.py --model_name_or_path {out}/students/diito_seed1 " in commands
    report = (out / "report.md").read_text()
    assert "## Downstream tasks (test part)" in report
    for task in ("same_document", "replaced"):
        down = summary["downstream"][task]
        for name in ("teacher", "init", "random", *MAIN):
            assert set(down[name]) == {"seed 1"}, name
        for arm in MAIN:
            found = json.loads((out / "downstream" / task / f"{arm}_seed1_ft1" / "eval_results.json").read_text())
            assert down[arm]["seed 1"] == found["eval_accuracy"]
        assert f"--train_file {out}/tasks/{task}/train.jsonl --validation_file {out}/tasks/{task}/test.jsonl" \
            in commands
        # a task joins the verdict only with room: the teacher fine-tuned beats the random student (one seed: no
        # spread)
        room = down["teacher"]["seed 1"] > down["random"]["seed 1"]
        assert (f"standard|task:{task}" in summary["comparisons"]) == room
        assert (f"diito-standard|task:{task}" in summary["comparisons"]) == room
        assert ("**no room**" in report.split(f"- `{task}`:")[1].split("\n")[0]) == (not room)


@pytest.mark.e2e
def test_low_resource_arms_train_on_the_same_tenth_of_the_data(test_run):
    """standard_low and diito_low: --data_fraction on every run, the same part of the data for both, their own rows,
    and the comparison of DIITO's advantage with less data against the same with all of it."""
    out, _ = test_run
    summary = json.loads((out / "summary.json").read_text())
    fraction = quickstart.PRESETS["test"].low_resource
    commands = (out / "commands.sh").read_text().splitlines()
    for arm in ("standard_low", "diito_low"):
        line = next(c for c in commands if f"--dump_path {out}/students/{arm}_seed1" in c)
        assert f"--data_fraction {fraction:g}" in line
        assert summary[arm]["main"] and summary[arm]["split"] == "test"
    kept = [next(m for m in (out / "logs" / f"student_{arm}_seed1.log").read_text().splitlines()
                 if "corpus sequences kept" in m).split("kept")[0].split(": ")[-1] for arm in ("standard_low", "diito_low")]
    assert kept[0] == kept[1]  # "29 of 292 corpus sequences": the same part for both
    other = [c for c in commands if f"--dump_path {out}/students/ctl_weight_seed1 " in c]
    assert len(other) == 1 and "--data_fraction" not in other[0]
    assert {"diito_low-standard_low|perplexity", "low_vs_full|perplexity", "low_vs_full|effective_iia"} <= \
        set(summary["comparisons"])
    # the gap change is (diito_low - standard_low) - (diito - standard), paired by seed
    gap = summary["comparisons"]["low_vs_full|perplexity"]["diff"]
    p = {a: summary[a]["perplexity"]["seed 1"] for a in ("diito_low", "standard_low", "diito", "standard")}
    assert gap == pytest.approx((p["diito_low"] - p["standard_low"]) - (p["diito"] - p["standard"]))


@pytest.mark.e2e
def test_learning_curves_evaluate_snapshots_of_the_first_teachers_runs(test_run):
    """Each main run of the first teacher is evaluated at `curve_points` points: snapshots of the run and its end."""
    out, _ = test_run
    summary = json.loads((out / "summary.json").read_text())
    points = quickstart.PRESETS["test"].curve_points
    for arm in MAIN:
        curve = summary["curves"][arm]
        steps = summary[arm]["steps"]
        assert [c["step"] for c in curve] == [steps // points * i for i in range(1, points)] + [steps], arm
        assert curve[-1]["perplexity"] == summary[arm]["perplexity"]["seed 1"]
        per_step = summary["flops_per_step"][arm]
        assert [c["tflop"] for c in curve] == pytest.approx([per_step * c["step"] / 1e12 for c in curve])
        middle = curve[0]["step"]
        run = f"{arm}_seed1"
        ppl = json.loads((out / "eval" / f"{run}_step{middle}" / "eval_results.json").read_text())["perplexity"]
        assert curve[0]["perplexity"] == ppl and (out / "iia" / f"{run}_step{middle}" / "iia_results.json").is_file()
    # a snapshot is the run's student at that step: the evaluation of the run's end is not a snapshot's
    assert summary["curves"]["standard"][0]["perplexity"] != summary["curves"]["standard"][-1]["perplexity"]


@pytest.mark.e2e
def test_student_at_initialisation_is_the_extracted_student(test_run):
    """The init row is the very model every run starts from; the random student shares its shape, not its weights."""
    import torch
    from safetensors.torch import load_file

    out, _ = test_run
    init = load_file(str(out / "student_init" / "model" / "model.safetensors"))
    extracted = torch.load(out / "student_init" / "student_init.pth", map_location="cpu", weights_only=True)
    shared = [k for k in extracted if k in init]
    assert len(shared) >= len(init) - 2 and all(torch.equal(init[k], extracted[k]) for k in shared)
    rand = load_file(str(out / "random_student" / "model.safetensors"))
    assert rand.keys() == init.keys()
    assert not torch.equal(rand["distilbert.transformer.layer.0.attention.q_lin.weight"],
                           init["distilbert.transformer.layer.0.attention.q_lin.weight"])


@pytest.mark.e2e
def test_terminal_shows_stage_lines_not_the_commands_output(test_run):
    out, proc = test_run
    assert len(proc.stdout) < 20_000, len(proc.stdout)
    assert "Loading weights" not in proc.stdout + proc.stderr  # the commands' own output went to logs/
    assert " - INFO - " not in proc.stdout + proc.stderr
    assert "Loading weights" in (out / "logs" / "teacher.log").read_text() or \
        "Loading weights" in (out / "logs" / "eval_teacher.log").read_text()
    assert "quickstart finished" in proc.stdout and "report:" in proc.stdout


@pytest.mark.e2e
def test_stage_seconds_are_those_of_each_stage(test_run):
    """summary.json's stage_seconds: the teacher's training is not overwritten by its evaluation."""
    out, _ = test_run
    seconds = json.loads((out / "summary.json").read_text())["stage_seconds"]
    assert seconds["teacher"] == json.loads((out / "teacher" / ".done").read_text())["seconds"]
    assert seconds["eval/teacher"] == json.loads((out / "eval" / "teacher" / ".done").read_text())["seconds"]
    assert seconds["students/ctl_weight_seed1"] == \
        json.loads((out / "students" / "ctl_weight_seed1" / ".done").read_text())["seconds"]
    assert "students/diito_seed1" not in seconds  # (the tuning run it is: its time is counted once)
    assert seconds["iia/diito_seed1"] == json.loads((out / "iia" / "diito_seed1" / ".done").read_text())["seconds"]


@pytest.mark.e2e
def test_same_command_same_numbers(two_runs):
    """A second run of the same command, from nothing, gives bitwise the same corpus, tokenizer and numbers
    (before the tests below add to the first run)."""
    (out, _), (second, _) = two_runs
    assert_same_numbers(out, second, MAIN)


@pytest.mark.e2e
def test_train_validation_and_test_share_no_document(test_run):
    out, _ = test_run
    parts = [set((out / "corpus" / f"{n}.txt").read_text().splitlines()) for n in ("train", "validation", "test")]
    assert all(parts) and not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]


@pytest.mark.e2e
def test_report_numbers_are_finite(test_run):
    out, _ = test_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == list(range(1, SEEDS + 1))
    values = [summary["teacher"]["perplexity"]]
    for ref in ("student_init", "random_student"):
        values += [summary[ref]["perplexity"]["1"], summary[ref]["iia"]["1"], summary[ref]["base_agreement"]["1"]]
    for objective in MAIN:
        values += list(summary[objective]["perplexity"].values()) + [summary[objective]["mean"]]
        values += list(summary[objective]["train_seconds"].values())
        values += list(summary[objective]["iia"].values()) + list(summary[objective]["effective_iia"].values())
        values += list(summary[objective]["base_agreement"].values())
        assert summary[objective]["parameters"] < summary["teacher"]["parameters"]
        assert all(0.0 <= v <= 1.0 for v in summary[objective]["iia"].values())
        # one teacher: no verdict, whatever its one seed says
        assert summary["comparisons"][f"{objective}|perplexity"]["result"] == "no verdict (one teacher)"
        assert summary["comparisons"][f"{objective}|perplexity"]["outcome"] == "no clear difference"
    # the random student is the floor: near-chance perplexity and (almost) no agreement with the teacher
    assert summary["random_student"]["perplexity"]["1"] > summary["student_init"]["perplexity"]["1"]
    assert summary["random_student"]["base_agreement"]["1"] < summary["student_init"]["base_agreement"]["1"]
    # equal compute: the third arm's steps are the DIITO steps scaled by the counted FLOPs per step
    ratio = summary["flops_per_step"]["ratio"]
    assert 1.2 < ratio < 4
    assert summary["standard_eqc"]["steps"] == round(summary["diito"]["steps"] * ratio)
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in values), values
    report = (out / "report.md").read_text()
    result = report.split("## Result")[1].split("\n## ")[0]
    table = [line for line in result.splitlines() if line.startswith("| ") and "perplexity" not in line]
    labels = build_arms(True, quickstart_mlm.DEFAULT_OBJECTIVE, quickstart_mlm.DEFAULT_SMOOTHING,
                        weight=summary["tuning"]["weight"], low_resource=quickstart.PRESETS["test"].low_resource)
    rows = {"teacher (BERT)": "teacher", "student at initialisation (no distillation)": "init",
            "random student of the same shape": "random", **{labels[a].label: a for a in MAIN}}
    assert [line.split("|")[1].strip() for line in table if line.split("|")[1].strip() in rows] == list(rows)
    for line in table:
        if line.split("|")[1].strip() in rows:
            numbers = [float(x) for x in re.findall(r"\d+\.\d+", line.split("|")[4])]
            assert numbers and all(math.isfinite(x) for x in numbers), line
    assert not re.search(r"\b(nan|inf)\b", "\n".join(table), re.IGNORECASE)
    assert summary["verdict"] in report and len(summary["verdict"].splitlines()) == 3
    assert "equal steps" in summary["verdict"] and "equal compute" in summary["verdict"]
    assert "initialisation" in summary["verdict"] and "weight-matched" in summary["verdict"]
    assert all("no verdict (one teacher)" in line for line in summary["verdict"].splitlines())
    assert "does not cover" in report and "The ablation was not run" in report and "Holm" in report
    assert "measures that teacher only" in report and "another CPU kind" in report
    assert summary["corpus"]["origin"] in report and summary["corpus"]["corpus_sha256"][:12] in report
    env = summary["environment"]
    assert f"torch {env['packages']['torch']}" in report and env["cpu"] in report
    assert env["kernels"] == "AVX2" and env["pinned"] and env["warnings"] == []
    # The mapping aligns each student block with the teacher block it was copied from, full width.
    mapping = json.loads((out / "student_init" / "diito.nm").read_text())["interchange_variable_mappings"]
    sidecar = json.loads((out / "student_init" / "student_init.pth.json").read_text())
    assert [m["teacher_variable_names"][0].split("$")[1] for m in mapping] == [f"L:{t}" for t in sidecar["teacher_layers"]]


@pytest.mark.e2e
def test_rerun_skips_finished_stages_and_redoes_only_what_is_missing(test_run):
    out, _ = test_run
    args = [*FAST, "--out", str(out)]
    commands_before = (out / "commands.sh").read_text().count("\npython ")
    again = run_quickstart(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert (out / "commands.sh").read_text().count("\npython ") == commands_before  # nothing was run again
    # every stage found done (one `.done` each) was skipped
    assert again.stdout.count("skipping") == len(list(out.glob("**/.done")))

    # Lose one evaluation: only it and the report are redone. (A stage folder that lost its .done alone is not
    # known to be the quickstart's any more: it is refused, not replaced; tests/test_pipeline_stages.py.)
    shutil.rmtree(out / "eval" / f"diito_seed{SEEDS}")
    third = run_quickstart(*args)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    new = (out / "commands.sh").read_text().split("\npython ")[commands_before + 1:]
    assert len(new) == 1 and new[0].startswith("run_mlm.py") and f"diito_seed{SEEDS}" in new[0]
    assert re.search(r"report: done already", third.stdout) is None


@pytest.mark.e2e
def test_ablation_stage_adds_only_its_runs(test_run):
    """The same quickstart without --no_ablation: only the ablation's runs and evaluations (and the report) are
    added, and the report gains the ablation table and plot."""
    out, _ = test_run
    before = (out / "commands.sh").read_text().split("\npython ")
    proc = run_quickstart(*[a for a in FAST if a != "--no_ablation"], "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new = (out / "commands.sh").read_text().split("\npython ")[len(before):]
    assert sorted(c.split()[0] for c in new) == sorted(["causal_train.py", "run_mlm.py"] * len(ABLATION) * SEEDS)
    summary = json.loads((out / "summary.json").read_text())
    report = (out / "report.md").read_text()
    assert "## Tuning and ablation" in report and "The ablation was not run" not in report
    for arm in ABLATION:
        assert summary[arm]["main"] is False and len(summary[arm]["perplexity"]) == SEEDS
        assert f"| {quickstart_mlm.MlmQuickstart.arms[arm].label} |" in report
    assert "smoothing 0.7" in report and "smoothing 0)" in report


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("empty", "is empty"),
    ("too_small", "too few to split"),
])
def test_bad_corpus_fails_before_training(tmp_path, case, message):
    path = tmp_path / "corpus.txt"
    if case == "empty":
        path.write_text("\n  \n")
    elif case == "too_small":
        path.write_text("\n".join(prose_lines(5)) + "\n")
    out = tmp_path / "out"
    proc = run_quickstart("--preset", "test", "--text", str(path), "--out", str(out), timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and str(path) in proc.stderr
    assert not out.exists()  # nothing written, nothing trained


def test_bad_flags_are_cli_errors(tmp_path):
    with pytest.raises(CliError, match="--seeds"):
        quickstart.parse_args(["--seeds", "0"])
    with pytest.raises(CliError, match="--teachers"):
        quickstart.parse_args(["--teachers", "0"])
    with pytest.raises(CliError, match="--heldout_fraction"):
        quickstart.parse_args(["--heldout_fraction", "0.9"])
    with pytest.raises(CliError, match="--tokenizer"):
        quickstart.main(["--tokenizer", str(tmp_path / "no_such_tokenizer"), "--out", str(tmp_path / "o")])


def test_teachers_flag_sets_how_many_teachers_any_preset_trains():
    chosen = quickstart.chosen_preset
    assert chosen(quickstart.parse_args([])).teachers == 1
    assert chosen(quickstart.parse_args(["--preset", "study"])).teachers == 5
    five = chosen(quickstart.parse_args(["--teachers", "5", "--family", "llama"]))
    assert five.teachers == 5 and five == replace(chosen(quickstart.parse_args(["--family", "llama"])), teachers=5)
    assert chosen(quickstart.parse_args(["--preset", "study", "--teachers", "2"])).teachers == 2


def test_user_text_corpus_stage(tmp_path):
    """--text: paragraphs separated by blank lines become documents; the three parts share none."""
    paragraphs = [f"{line}\nIt goes on for a second line, wrapped." for line in prose_lines(40)]
    text = tmp_path / "book.txt"
    text.write_text("\n\n".join(paragraphs) + "\n")
    args = quickstart.parse_args(["--preset", "test", "--text", str(text), "--out", str(tmp_path / "out")])
    docs = quickstart_pipeline.read_text_files(args.text)
    assert len(docs) == 40 and all("\n" not in d and d.endswith("wrapped.") for d in docs)
    record = quickstart_mlm.MlmQuickstart(args, quickstart.PRESETS["test"], docs).corpus()
    assert (record["train_documents"], record["validation_documents"], record["test_documents"]) == (32, 4, 4)
    parts = [set((tmp_path / "out" / "corpus" / f"{n}.txt").read_text().splitlines())
             for n in ("train", "validation", "test")]
    assert len(set.union(*parts)) == 40 and sum(map(len, parts)) == 40
    # Which documents are held out does not depend on their order or on duplicates, and the test part is the one a
    # two-way split held out: adding the validation part moves no test document.
    split = quickstart_pipeline.split_corpus
    assert [set(p) for p in split(docs, (0.1, 0.1), "x")] == \
        [set(p) for p in split(docs[::-1] + docs[:3], (0.1, 0.1), "x")]
    assert set(split(docs, (0.1, 0.1), "x")[2]) == set(split(docs, (0.2, 0.1), "x")[2])


def test_split_documents_lines_or_paragraphs():
    assert quickstart_pipeline.split_documents("one doc\ntwo doc\n\n") == ["one doc", "two doc"]
    assert quickstart_pipeline.split_documents("first para\nwrapped\n\nsecond  para\n") == ["first para wrapped", "second para"]


def test_topic_prose_is_cleaned():
    assert doc_corpus.clean_topic_paragraph(
        "   Called after the instance has been created, but before it is\n   returned to the caller.") \
        == "Called after the instance has been created, but before it is returned to the caller."
    assert doc_corpus.clean_topic_paragraph("The \"if\" statement\n******************") is None
    assert doc_corpus.clean_topic_paragraph("   >>> x = 1\n   >>> print(x)") is None
    assert doc_corpus.clean_topic_paragraph('   if_stmt ::= "if" assignment_expression ":" suite') is None
    docs = doc_corpus.pydoc_topic_documents()
    assert len(docs) > 500 and sum(len(d.split()) for d in docs) > 20000


def test_wordpiece_vocabulary_is_learnt_reproducibly():
    """Ties between equally frequent pairs are broken by text, not by hash order: any word order, one vocabulary."""
    from collections import Counter

    from deterministic_wordpiece import learn_vocab

    words = {"ab": 2, "ba": 2, "abab": 1, "cab": 3}
    vocab = learn_vocab(Counter(words), 20)
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert vocab[5:10] == ["a", "b", "c", "##a", "##b"]  # the alphabet, sorted
    # ("##a", "##b") occurs 4 times (abab, cab x 3), the most: merged first. Then ("a", "##b") and ("c", "##ab")
    # tie at 3: the first in text order wins.
    assert vocab[10:13] == ["##ab", "ab", "cab"]
    reordered = learn_vocab(Counter(dict(reversed(list(words.items())))), 20)
    assert reordered == vocab


def test_the_shipped_corpus_is_what_its_manifest_and_the_docs_say():
    """A fresh clone reads the corpus from data/: its SHA-256 is the manifest's and the one docs/quickstart.md names."""
    import hashlib
    import lzma

    manifest = json.loads(doc_corpus.SHIPPED.with_name("quickstart_corpus.json").read_text())
    raw = lzma.decompress(doc_corpus.SHIPPED.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == manifest["sha256"]
    assert manifest["sha256"] in (ROOT / "docs" / "quickstart.md").read_text()
    lines, documents, _ = doc_corpus.shipped_corpus()
    assert len(lines) == manifest["lines"] == sum(n for _, n in documents)
    # the test preset's first paragraphs: whole documents but the last, cut to fit
    first, docs, _ = doc_corpus.shipped_corpus(400)
    assert first == lines[:400] and sum(n for _, n in docs) == 400 and docs[:-1] == documents[:len(docs) - 1]


def test_a_damaged_shipped_corpus_is_refused_by_name(tmp_path):
    import lzma

    copy = tmp_path / "quickstart_corpus.txt.xz"
    raw = lzma.decompress(doc_corpus.SHIPPED.read_bytes())
    copy.write_bytes(lzma.compress(raw.replace(b"the", b"teh", 1)))
    shutil.copy(doc_corpus.SHIPPED.with_name("quickstart_corpus.json"), tmp_path / "quickstart_corpus.json")
    with pytest.raises(doc_corpus.CorpusError, match=f"{copy}.*has SHA-256 .*its manifest .*says"):
        doc_corpus.shipped_corpus(path=copy)
    copy.write_bytes(b"not xz")
    with pytest.raises(doc_corpus.CorpusError, match="cannot be read"):
        doc_corpus.shipped_corpus(path=copy)


@pytest.mark.e2e
def test_the_shipped_corpus_is_what_its_recipe_builds_with_its_versions(tmp_path):
    """scripts/stdlib_corpus.py with the manifest's command gives the shipped bytes, in a fresh interpreter with the
    Python and package versions the manifest names (skipped with others: they give other documents)."""
    manifest = json.loads(doc_corpus.SHIPPED.with_name("quickstart_corpus.json").read_text())
    found = doc_corpus.versions(list(manifest["packages"]))
    if found["python"] != manifest["python"] or found["packages"] != manifest["packages"]:
        pytest.skip(f"installed {found}, the shipped corpus was built with {manifest['python']}, {manifest['packages']}")
    built = tmp_path / "corpus.txt"
    env = dict(os.environ, **QUICKSTART_ENV, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "stdlib_corpus.py"), "--out", str(built), "--pydoc_topics",
                    "--packages", *manifest["packages"]], cwd=ROOT, env=env, check=True, capture_output=True)
    assert built.read_bytes() == "\n".join(doc_corpus.shipped_corpus()[0]).encode() + b"\n"


def test_an_interrupt_stops_the_commands_of_every_job(tmp_path):
    """With --jobs 2 the commands run in worker threads: Ctrl-C or SIGTERM in the main thread must stop them too,
    not wait for them to finish (a study-preset teacher runs for half an hour)."""
    import signal
    import time

    script = tmp_path / "sleeper.py"
    script.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(300)\n")
    pipe = quickstart_pipeline.Pipeline(tmp_path / "out", False, dict(os.environ), jobs=2, preload=False)
    pids = [tmp_path / f"pid{k}" for k in range(2)]

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    start = time.time()
    try:
        signal.setitimer(signal.ITIMER_REAL, 3)
        with pytest.raises(KeyboardInterrupt):
            pipe.parallel([lambda p=p: pipe.command(p.name, str(script), [str(p)]) for p in pids])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.time() - start < 60
    for p in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(int(p.read_text()), 0)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_the_quickstart_says_how_to_continue_when_stopped(tmp_path, monkeypatch, caplog, how):
    import os

    def stopped(self):
        if how == "ctrl-c":
            raise KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)

    class Unhandled(Exception):
        pass

    def guard(signum, frame):  # what the test sees if the quickstart did not take SIGTERM itself
        raise Unhandled

    monkeypatch.setattr(quickstart_mlm.MlmQuickstart, "run", stopped)
    before = signal.signal(signal.SIGTERM, guard)
    try:
        with pytest.raises(SystemExit) as stop:
            quickstart.main(["--out", str(tmp_path / "q"), "--preset", "test"])
        assert signal.getsignal(signal.SIGTERM) == guard  # put back as it was
    finally:
        signal.signal(signal.SIGTERM, before)
    signum = signal.SIGINT if how == "ctrl-c" else signal.SIGTERM
    assert stop.value.code == 128 + signum
    assert (f"stopped by {signal.Signals(signum).name}: run the same command again to continue (finished stages are "
            f"skipped") in caplog.text
