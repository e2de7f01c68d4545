"""scripts/make_downstream_tasks.py: offline downstream tasks from the shipped corpus, split by document."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import ROOT

from doc_corpus import shipped_corpus
from pipelines.quickstart.downstream import REPLACED_TAGS, TASKS, TOKEN_TASKS, labels_of, source_of

SCRIPT = ROOT / "scripts" / "make_downstream_tasks.py"
PARAGRAPHS = 6000  # the corpus's first paragraphs: enough documents of several sources, built in a second
ARGS = ["--max_documents", str(PARAGRAPHS), "--train_examples", "300", "--eval_examples", "120"]


def build(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=300)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tasks")
    proc = build(out)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def document_of() -> dict[str, str]:
    """Each paragraph of the corpus's first PARAGRAPHS and the document it belongs to (its first, if repeated)."""
    lines, documents, _ = shipped_corpus(PARAGRAPHS)
    groups = [name for name, n in documents for _ in range(n)]
    return dict(zip(reversed(lines), reversed(groups)))


def texts_in(rows: list[dict]) -> set[str]:
    return {text for r in rows for key in ("sentence", "sentence1", "sentence2") if key in r for text in [r[key]]}


SENTENCE_TASKS = [t for t in TASKS if t not in TOKEN_TASKS]


@pytest.fixture(scope="module")
def parts() -> dict[str, list[str]]:
    """The quickstart's split of the corpus's first PARAGRAPHS: the paragraphs of each part."""
    from pipelines.quickstart.pipeline import split_corpus

    lines, documents, _ = shipped_corpus(PARAGRAPHS)
    groups = [name for name, n in documents for _ in range(n)]
    return dict(zip(("train", "validation", "test"), split_corpus(lines, (0.1, 0.1), "the corpus", groups)))


def kept_words_match(row: dict, words: list[str]) -> bool:
    """Whether `row` (a `replaced` example) is `words` with some words swapped: same length, the same word at every
    position tagged O, another word at every swapped one."""
    return len(words) == len(row["tokens"]) and all(
        (w == t) == (tag == "O") for w, t, tag in zip(words, row["tokens"], row["ner_tags"]))


@pytest.mark.parametrize("task", SENTENCE_TASKS)
def test_no_document_is_in_two_parts(tasks, document_of, task):
    """Every paragraph of a part (both of a pair's) comes from documents no other part draws on."""
    docs = {}
    for part in ("train", "validation", "test"):
        docs[part] = {document_of[text] for text in texts_in(read_rows(tasks / task / f"{part}.jsonl"))}
        assert docs[part], part
    assert not docs["train"] & docs["test"]
    assert not docs["train"] & docs["validation"]
    assert not docs["validation"] & docs["test"]


@pytest.mark.parametrize("part", ["train", "validation", "test"])
def test_replaced_rows_come_from_their_own_part(tasks, parts, part):
    """Each `replaced` example is a paragraph of its own part (cut to 48 words) with words swapped for words of
    that part: none is drawn from another part's documents."""
    by_length: dict[int, list[list[str]]] = {}
    for text in parts[part]:
        words = text.split()[:48]
        by_length.setdefault(len(words), []).append(words)
    own_words = {w for text in parts[part] for w in text.split()[:48]}
    rows = read_rows(tasks / "replaced" / f"{part}.jsonl")
    assert rows
    for r in rows:
        assert any(kept_words_match(r, words) for words in by_length.get(len(r["tokens"]), [])), r
        assert set(r["tokens"]) <= own_words


def test_a_replaced_words_identity_tells_nothing(tasks):
    """Half the words are swapped, and a frequent word is swapped in as often as it is kept: the swapped-in words
    follow the text's own frequencies, so only context can tell (drawing from the vocabulary instead would leave
    frequent words almost always original)."""
    rows = read_rows(tasks / "replaced" / "train.jsonl")
    tags = labels_of(rows)
    assert set(tags) == set(REPLACED_TAGS)
    assert 0.45 < tags.count("B-REPLACED") / len(tags) < 0.55
    seen: dict[str, list[bool]] = {}
    for r in rows:
        for word, tag in zip(r["tokens"], r["ner_tags"]):
            seen.setdefault(word, []).append(tag != "O")
    frequent = {w: sum(v) / len(v) for w, v in seen.items() if len(v) >= 100}
    assert len(frequent) >= 5
    assert all(0.35 < share < 0.65 for share in frequent.values()), frequent


def test_the_parts_are_the_quickstarts_split(tasks, document_of, tmp_path):
    """The test part's documents are the quickstart's test documents (the same rule, the same fractions)."""
    from pipelines.quickstart.pipeline import split_corpus

    lines, documents, _ = shipped_corpus(PARAGRAPHS)
    groups = [name for name, n in documents for _ in range(n)]
    _, _, test = split_corpus(lines, (0.1, 0.1), "the corpus", groups)
    rows = read_rows(tasks / "source" / "test.jsonl")
    assert {r["sentence"] for r in rows} <= set(test)
    # source keeps every test paragraph up to --eval_examples
    assert len(rows) == min(120, len(test))


def test_labels_say_what_the_task_asks(tasks, document_of):
    for part in ("train", "test"):
        for r in read_rows(tasks / "source" / f"{part}.jsonl"):
            assert r["label"] == source_of(document_of[r["sentence"]])
        pairs = read_rows(tasks / "same_document" / f"{part}.jsonl")
        for r in pairs:
            a, b = document_of[r["sentence1"]], document_of[r["sentence2"]]
            assert r["label"] == int(a == b)
            assert r["sentence1"] != r["sentence2"]
        # balanced, and negatives share the source where they can (here always: each source has many documents)
        assert Counter(r["label"] for r in pairs) == {0: len(pairs) // 2, 1: len(pairs) - len(pairs) // 2}
        negatives = [r for r in pairs if r["label"] == 0]
        same_source = sum(source_of(document_of[r["sentence1"]]) == source_of(document_of[r["sentence2"]])
                          for r in negatives)
        assert same_source >= 0.9 * len(negatives)


def test_manifest_counts_and_baselines_match_the_files(tasks):
    manifest = json.loads((tasks / "tasks.json").read_text())
    for task in TASKS:
        for part, entry in manifest["tasks"][task].items():
            rows = read_rows(tasks / entry["file"])
            # a token-level task counts its words' tags
            counts = Counter(str(t) for r in rows for t in r.get("ner_tags", [r.get("label")]))
            assert entry["examples"] == len(rows) and entry["classes"] == dict(counts)
            assert math.isclose(entry["majority_accuracy"], max(counts.values()) / sum(counts.values()))
    assert manifest["corpus_sha256"] == json.loads((ROOT / "data" / "quickstart_corpus.json").read_text())["sha256"]


def test_same_settings_same_bytes_and_the_seed_matters(tasks, tmp_path):
    again = tmp_path / "again"
    assert build(again).returncode == 0
    for task in TASKS:
        for part in ("train", "validation", "test"):
            assert (again / task / f"{part}.jsonl").read_bytes() == (tasks / task / f"{part}.jsonl").read_bytes()
    other = tmp_path / "other"
    assert build(other, "--seed", "1").returncode == 0
    assert (other / "source" / "train.jsonl").read_bytes() != (tasks / "source" / "train.jsonl").read_bytes()


@pytest.mark.parametrize("extra, fragment", [
    (["--heldout_fraction", "0.5"], "--heldout_fraction must lie in (0, 0.3]"),
    (["--train_examples", "0"], "--train_examples must be at least 2"),
    (["--max_documents", "40"], "too few"),
])
def test_bad_settings_name_the_flag(tmp_path, extra, fragment):
    proc = build(tmp_path / "t", *extra)
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "t" / "tasks.json").exists()


def test_run_glue_and_run_ner_fine_tune_on_every_task(tmp_path, tasks, tokenizer_dir):
    """The files are what run_glue.py reads without --task_name (one sentence or a pair, string or int labels) and
    what run_ner.py reads (words and their tags)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    import run_glue
    import run_ner

    model = tmp_path / "bert"
    config = BertConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)), hidden_size=32,
                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(model)
    for task in TASKS:
        out = tmp_path / task
        results = (run_ner if task in TOKEN_TASKS else run_glue).main(
            ["--model_name_or_path", str(model), "--train_file", str(tasks / task / "train.jsonl"),
             "--validation_file", str(tasks / task / "test.jsonl"), "--do_train", "--do_eval", "--max_steps", "2",
             "--max_seq_length", "64", "--save_strategy", "no", "--output_dir", str(out),
             "--tokenizer_name", str(tokenizer_dir), "--use_cpu", "--report_to", "none", "--disable_tqdm", "true",
             "--per_device_train_batch_size", "8", "--seed", "0"])
        assert 0.0 <= results["eval_accuracy"] <= 1.0
        labels = json.loads((out / "config.json").read_text())["label2id"]
        expected = set(labels_of(read_rows(tasks / task / "train.jsonl")))
        assert set(labels) == expected


def test_the_stage_fine_tunes_the_presets_tasks_each_with_its_script(tmp_path):
    """Stage 9 fine-tunes only the tasks the preset names (the study preset: `replaced`), a token-level task with
    run_ner.py and the others with run_glue.py, every model with each of its seeds."""
    from dataclasses import replace
    from types import SimpleNamespace

    from pipelines.quickstart.downstream import DownstreamStages
    from pipelines.quickstart.pipeline import PRESETS

    class Pipe:
        def unit(self, name, folder, settings, work, outputs=()):
            return {"name": name, "script": settings["script"], "argv": settings["argv"]}

        def parallel(self, jobs):
            return [job() for job in jobs]

    def stage(preset):
        q = DownstreamStages()
        q.preset, q.out, q.pipe, q.banner = preset, tmp_path, Pipe(), lambda *a: None
        models = {"teacher": (tmp_path / "teacher", {"key": "t"}, [1, 2]),
                  "diito_seed1": (tmp_path / "d", {"key": "d"}, [1])}
        return q.downstream({"tasks": ["replaced", "same_document"], "key": "k"}, models)

    study = stage(PRESETS["study"])
    assert PRESETS["study"].downstream_tasks == ("replaced",)
    assert sorted(study) == ["replaced/diito_seed1_ft1", "replaced/teacher_ft1", "replaced/teacher_ft2"]
    assert {r["script"] for r in study.values()} == {"run_ner.py"}
    every = stage(replace(PRESETS["study"], downstream_tasks=None))
    assert sorted({k.split("/")[0] for k in every}) == ["replaced", "same_document"]
    assert {every[k]["script"] for k in every if k.startswith("same_document/")} == {"run_glue.py"}
    assert stage(replace(PRESETS["study"], downstream_tasks=("source",))) == {}
