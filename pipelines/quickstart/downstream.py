"""Downstream tasks built from the quickstart's corpus, offline: what a distilled student is fine-tuned on.

Two tasks, both from the shipped documentation corpus and its split by document (`split_corpus`, the
quickstart's own), so that a task's test examples come only from the quickstart's test documents and its
training examples only from its train documents:

- `source` (sequence classification): which documentation a paragraph comes from (torch, numpy, scipy,
  scikit-learn, transformers, datasets, the standard library's docstrings, pydoc's topic help);
- `same_document` (sentence pairs): do two paragraphs come from the same document (a module, a topic, a
  package file)? Negatives are drawn from another document of the same source where there is one, so that
  telling the sources apart does not solve the task.

There is no natural token-level task in this corpus (it was cleaned of code and markup, so no span of it carries
a label of its own); none is built. Every example is drawn with a seeded `random.Random`, so the same corpus,
split and settings give the same bytes. Each part is a JSON-lines file with the columns `run_glue.py` reads
without `--task_name` (`sentence`, `label`; `sentence1`, `sentence2`, `label`).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from atomic_files import atomic_write_text
from pipelines.quickstart.pipeline import SPLITS, split_corpus

TASKS = ("source", "same_document")


@dataclass(frozen=True)
class Part:
    """The paragraphs of one part of the split and the document each belongs to."""

    paragraphs: list[str]
    documents: list[str]

    def by_document(self) -> dict[str, list[str]]:
        grouped: dict[str, list[str]] = {}
        for text, doc in zip(self.paragraphs, self.documents):
            grouped.setdefault(doc, []).append(text)
        return grouped


def source_of(document: str) -> str:
    """The source a document belongs to: its name up to the colon (`torch:nn/modules/linear.py` -> `torch`)."""
    return document.split(":", 1)[0]


def split_parts(lines: list[str], groups: list[str], fractions: tuple[float, float]) -> dict[str, Part]:
    """The quickstart's split of `lines` (document `groups[i]` each), each part with the document of every line.

    A repeated line belongs to its first document, as in `split_corpus`."""
    owner = dict(zip(reversed(lines), reversed(groups)))
    parts = dict(zip(SPLITS, split_corpus(lines, fractions, "the corpus", groups)))
    return {name: Part(part, [owner[p] for p in part]) for name, part in parts.items()}


def source_examples(part: Part, limit: int | None, rng: random.Random) -> list[dict]:
    """One example per paragraph (`sentence`, `label`: its source), shuffled, at most `limit`."""
    rows = [{"sentence": text, "label": source_of(doc)} for text, doc in zip(part.paragraphs, part.documents)]
    rng.shuffle(rows)
    return rows[:limit] if limit is not None else rows


def same_document_examples(part: Part, n: int, rng: random.Random) -> list[dict]:
    """`n` pairs (as near half positive as the part allows): two paragraphs of one document (label 1) or of two
    documents (label 0), the second of the same source when the source has another document."""
    docs = part.by_document()
    multi = sorted(d for d, texts in docs.items() if len(texts) >= 2)
    names = sorted(docs)
    by_source: dict[str, list[str]] = {}
    for d in names:
        by_source.setdefault(source_of(d), []).append(d)
    if not multi or len(names) < 2:
        return []
    # weighting documents by their pair count would let a few long modules supply most positives; one
    # document drawn uniformly, then two of its paragraphs, keeps the pairs spread over the part
    rows = []
    for i in range(n):
        if i % 2 == 0:
            doc = rng.choice(multi)
            a, b = rng.sample(docs[doc], 2)
            rows.append({"sentence1": a, "sentence2": b, "label": 1})
        else:
            doc = rng.choice(names)
            kin = [d for d in by_source[source_of(doc)] if d != doc] or [d for d in names if d != doc]
            other = rng.choice(kin)
            rows.append({"sentence1": rng.choice(docs[doc]), "sentence2": rng.choice(docs[other]), "label": 0})
    rng.shuffle(rows)
    return rows


def balance(rows: list[dict]) -> dict:
    """Class counts and the majority-class baseline (the accuracy of always answering the commonest label)."""
    counts = Counter(str(r["label"]) for r in rows)
    top = max(counts.values()) if counts else 0
    return {"examples": len(rows), "classes": dict(sorted(counts.items())),
            "majority_label": max(sorted(counts), key=counts.get) if counts else None,
            "majority_accuracy": top / len(rows) if rows else None}


def build_tasks(parts: dict[str, Part], sizes: dict[str, int], seed: int) -> dict[str, dict[str, list[dict]]]:
    """Every task's train/validation/test examples; `sizes[part]` caps (source) or sets (pairs) their number."""
    tasks: dict[str, dict[str, list[dict]]] = {t: {} for t in TASKS}
    for name in SPLITS:
        tasks["source"][name] = source_examples(parts[name], sizes[name], random.Random(f"{seed}:source:{name}"))
        tasks["same_document"][name] = same_document_examples(
            parts[name], sizes[name], random.Random(f"{seed}:same_document:{name}"))
    return tasks


def write_tasks(out: Path, tasks: dict[str, dict[str, list[dict]]], record: dict) -> dict:
    """Write `out/<task>/<part>.jsonl` and `out/tasks.json` (sizes, balance, baselines and `record`), atomically,
    the manifest last. Returns the manifest."""
    manifest = {**record, "tasks": {}}
    for task, split in tasks.items():
        manifest["tasks"][task] = {}
        for name, rows in split.items():
            path = out / task / f"{name}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
            manifest["tasks"][task][name] = {"file": f"{task}/{name}.jsonl", **balance(rows)}
    atomic_write_text(out / "tasks.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest
