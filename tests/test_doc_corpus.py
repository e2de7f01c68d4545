"""The offline corpus: installed packages' documentation, recorded versions, same versions same bytes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

import doc_corpus
from pipelines.quickstart import pipeline as quickstart_pipeline

SCRIPT = ROOT / "scripts" / "stdlib_corpus.py"


def make_corpus(out, *args, hash_seed="0"):
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_same_versions_give_the_same_bytes(tmp_path):
    """Two processes with different hash seeds write byte-identical corpora and manifests that name the versions."""
    args = ["--pydoc_topics", "--packages", "datasets", "numpy"]
    runs = []
    for i, seed in enumerate(("1", "2")):
        out, manifest = tmp_path / f"c{i}.txt", tmp_path / f"c{i}.json"
        proc = make_corpus(out, *args, "--manifest", str(manifest), hash_seed=seed)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append((out.read_bytes(), manifest.read_bytes()))
    assert runs[0] == runs[1]
    record = json.loads(runs[0][1])
    from importlib.metadata import version

    assert record["packages"] == {"datasets": version("datasets"), "numpy": version("numpy")}
    lines = runs[0][0].decode("utf-8").splitlines()
    assert sum(n for _, n in record["documents"]) == len(lines) == record["lines"] == len(set(lines))
    sources = {name.split(":")[0] for name, _ in record["documents"]}
    assert sources == {"stdlib", "pydoc_topics", "datasets", "numpy"}
    # a package adds its own documents, files named by their path in the package
    assert any(name.startswith("numpy:numpy/") and name.endswith(".py") for name, _ in record["documents"])


def test_package_documentation_is_prose():
    docs = list(doc_corpus.package_grouped("datasets"))
    assert len(docs) > 100
    for _, text in docs:
        assert doc_corpus.clean_paragraph(text, markdown=True) == text  # cleaned already: a fixed point
        assert len(text.split()) >= 8 and text[0].isupper() and text[-1] in ".?!"
    assert doc_corpus.clean_paragraph("See [the guide](https://x.y/z) for how the pieces fit together here.",
                                      markdown=True) == "See the guide for how the pieces fit together here."
    assert doc_corpus.clean_paragraph("See [the guide](https://x.y/z) for how the pieces fit together here.") is None
    assert list(doc_corpus.package_grouped("no-such-package-here")) == []


def test_missing_package_is_an_error(tmp_path):
    proc = make_corpus(tmp_path / "c.txt", "--packages", "no-such-package-here")
    assert proc.returncode == 2 and "no-such-package-here" in proc.stderr
    assert not (tmp_path / "c.txt").exists()


def test_split_by_document_keeps_each_document_whole():
    docs = [f"Paragraph {i} of document {i // 7} is written out here in a sentence." for i in range(210)]
    groups = [f"doc{i // 7}" for i in range(210)]
    train, validation, test = quickstart_pipeline.split_corpus(docs, (0.2, 0.1), "x", groups)
    owner = dict(zip(docs, groups))
    owners = [{owner[d] for d in part} for part in (train, validation, test)]
    assert owners[0].isdisjoint(owners[1]) and owners[0].isdisjoint(owners[2]) and owners[1].isdisjoint(owners[2])
    assert 21 <= len(test) < 21 + 7 and 42 <= len(validation) < 42 + 7
    assert len(train) + len(validation) + len(test) == 210
    # the documents held out depend on their names, not on their order
    order = list(reversed(range(210)))
    again = quickstart_pipeline.split_corpus([docs[i] for i in order], (0.2, 0.1), "x", [groups[i] for i in order])
    assert set(again[1]) == set(validation) and set(again[2]) == set(test)
    with pytest.raises(Exception, match="too few"):
        quickstart_pipeline.split_corpus(docs, (0.1, 0.1), "x", ["one"] * 105 + ["two"] * 105)  # two documents
