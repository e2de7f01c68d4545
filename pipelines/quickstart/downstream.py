"""Downstream tasks built from the quickstart's corpus, offline: what a distilled student is fine-tuned on.

Three tasks, all from the shipped documentation corpus and its split by document (`split_corpus`, the
quickstart's own), so that a task's test examples come only from the quickstart's test documents and its
training examples only from its train documents:

- `source` (sequence classification): which documentation a paragraph comes from (torch, numpy, scipy,
  scikit-learn, transformers, datasets, the standard library's docstrings, pydoc's topic help);
- `same_document` (sentence pairs): do two paragraphs come from the same document (a module, a topic, a
  package file)? Negatives are drawn from another document of the same source where there is one, so that
  telling the sources apart does not solve the task;
- `replaced` (token classification): which words of a paragraph were swapped for a word drawn from the same
  part's text. Each word is swapped with probability one half, and a swapped-in word is drawn from the same
  word frequencies as the words it replaces, so a word's identity says nothing: only its context does. This
  is the task a language model's pretraining speaks to, so it is the one where a teacher can beat a random
  student after a short fine-tuning (the corpus was cleaned of code and markup, so no span carries a label of
  its own; this is the natural token-level task it poses).

Every example is drawn with a seeded `random.Random`, so the same corpus, split and settings give the same
bytes. Each part is a JSON-lines file with the columns `run_glue.py` reads without `--task_name` (`sentence`,
`label`; `sentence1`, `sentence2`, `label`) or those `run_ner.py` reads (`tokens`, `ner_tags`).
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from atomic_files import atomic_write_text
from pipelines.quickstart.pipeline import SPLITS, split_corpus

TASKS = ("source", "same_document", "replaced")
TOKEN_TASKS = frozenset({"replaced"})  # fine-tuned with run_ner.py (word tags), the others with run_glue.py
REPLACED_TAGS = ("O", "B-REPLACED")
REPLACED_RATE = 0.5  # balanced tags: chance is one half
REPLACED_WORDS = (4, 48)  # paragraphs of at least 4 words, cut to the first 48 (within 128 tokens)


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


def replaced_examples(part: Part, limit: int, rng: random.Random) -> list[dict]:
    """At most `limit` paragraphs (`tokens`: words, `ner_tags`: `B-REPLACED` where the word was swapped, else
    `O`), each word swapped with probability REPLACED_RATE for another word drawn from the part's own words."""
    low, high = REPLACED_WORDS
    paragraphs = [text.split()[:high] for text in part.paragraphs if len(text.split()) >= low]
    rng.shuffle(paragraphs)
    paragraphs = paragraphs[:limit]
    # drawn from the same part's running text, so a swapped-in word is as frequent as the words it replaces
    pool = [w for words in paragraphs for w in words]
    if len(set(pool)) < 2:
        return []
    rows = []
    for words in paragraphs:
        tokens, tags = [], []
        for word in words:
            swap = rng.random() < REPLACED_RATE
            new = word
            while swap and new == word:
                new = rng.choice(pool)
            tokens.append(new)
            tags.append(REPLACED_TAGS[swap])
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def labels_of(rows: list[dict]) -> list[str]:
    """Every label of `rows`: one per example, or one per word for a token-level task."""
    return [str(t) for r in rows for t in (r["ner_tags"] if "ner_tags" in r else [r["label"]])]


def balance(rows: list[dict]) -> dict:
    """Class counts and the majority-class baseline (the accuracy of always answering the commonest label),
    counted over words for a token-level task."""
    counts = Counter(labels_of(rows))
    top = max(counts.values()) if counts else 0
    return {"examples": len(rows), "labels": sum(counts.values()), "classes": dict(sorted(counts.items())),
            "majority_label": max(sorted(counts), key=counts.get) if counts else None,
            "majority_accuracy": top / sum(counts.values()) if counts else None}


def build_tasks(parts: dict[str, Part], sizes: dict[str, int], seed: int) -> dict[str, dict[str, list[dict]]]:
    """Every task's train/validation/test examples; `sizes[part]` caps (source, replaced) or sets (pairs) their
    number."""
    tasks: dict[str, dict[str, list[dict]]] = {t: {} for t in TASKS}
    for name in SPLITS:
        tasks["source"][name] = source_examples(parts[name], sizes[name], random.Random(f"{seed}:source:{name}"))
        tasks["same_document"][name] = same_document_examples(
            parts[name], sizes[name], random.Random(f"{seed}:same_document:{name}"))
        tasks["replaced"][name] = replaced_examples(parts[name], sizes[name], random.Random(f"{seed}:replaced:{name}"))
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


def usable_tasks(tasks: dict[str, dict[str, list[dict]]]) -> tuple[dict, list[str]]:
    """(the tasks with at least two classes in every part, the names of the others): a corpus with one source
    (the `test` preset's first paragraphs are all the standard library's) cannot pose `source`."""
    ok = {t: parts for t, parts in tasks.items() if all(len(set(labels_of(rows))) >= 2
                                                       for rows in parts.values())}
    return ok, sorted(set(tasks) - set(ok))


class DownstreamStages:
    """The quickstart's downstream stages (a mixin of `DistillQuickstart`): the tasks, built from the shipped corpus
    with the quickstart's split (stage 1), and every model fine-tuned on each of the preset's tasks with
    `run_glue.py` (`run_ner.py` for a token-level task) and scored on the test part (stage 9). References
    (teachers, initialisations, the random student) are fine-tuned with every student seed, so that each run
    pairs with its reference fine-tuned under the same seed."""

    def tasks(self, corpus: dict) -> dict | None:
        """The downstream tasks (`tasks/`), or None when there are none to build (why is printed)."""
        from pipelines.quickstart.pipeline import SPLIT_SEED, read_shipped

        p, args = self.preset, self.args
        why = ("--no_downstream" if args.no_downstream else "your --text corpus has no sources or documents to pose "
               "them" if self.user_docs is not None else f"preset {args.preset}" if not p.downstream_steps else None)
        if why:
            print(f"  downstream tasks: not built ({why})", flush=True)
            return None
        fractions = (args.validation_fraction, args.heldout_fraction)
        sizes = {"train": p.downstream_examples[0], "validation": p.downstream_examples[1],
                 "test": p.downstream_examples[1]}
        settings = {"corpus": corpus["key"], "sizes": sizes, "seed": 0, "tasks": 2}

        def work(folder: Path) -> dict:
            lines, groups, manifest = read_shipped(p.max_documents)
            built, skipped = usable_tasks(build_tasks(split_parts(lines, groups, fractions), sizes, 0))
            record = {"corpus_sha256": manifest["sha256"], "split": SPLIT_SEED, "fractions": list(fractions), "seed": 0}
            written = write_tasks(folder, built, record)["tasks"]
            print("  downstream tasks: " + "; ".join(
                f"{t} ({written[t]['train']['examples']} train, {written[t]['test']['examples']} test, majority "
                f"{100 * written[t]['test']['majority_accuracy']:.1f}%)" for t in built)
                + (f"; not posed by this corpus: {', '.join(skipped)}" if skipped else ""), flush=True)
            return {"tasks": sorted(built), "skipped": skipped, "balance": written}

        return self.pipe.unit("tasks", self.out / "tasks", settings, work, ("tasks.json",))

    def downstream(self, tasks: dict | None, models: dict[str, tuple[Path, dict, list[int]]]) -> dict:
        """Stage 9: each model (name -> (folder, record, fine-tuning seeds)) fine-tuned on each of the preset's
        tasks and scored on its test part. Returns {"<task>/<name>_ft<seed>": record with `accuracy`}."""
        p = self.preset
        names = [t for t in (tasks or {}).get("tasks", ()) if p.downstream_tasks is None or t in p.downstream_tasks]
        if not names:
            self.banner(9, "downstream tasks: not run (no tasks)")
            return {}
        jobs = [(task, name, folder, rec, seed) for task in names for name, (folder, rec, seeds) in models.items()
                for seed in seeds]
        self.banner(9, f"downstream tasks: {', '.join(names)}; {len(models)} models fine-tuned with run_glue.py or "
                       f"run_ner.py, {p.downstream_steps} steps each ({len(jobs)} runs), accuracy on the test part")

        def one(task: str, name: str, folder_in: Path, rec: dict, seed: int) -> dict:
            data = self.out / "tasks" / task
            script = "run_ner.py" if task in TOKEN_TASKS else "run_glue.py"
            argv = ["--model_name_or_path", folder_in, "--tokenizer_name", self.out / "tokenizer",
                    "--train_file", data / "train.jsonl", "--validation_file", data / "test.jsonl",
                    "--do_train", "--do_eval", "--max_steps", p.downstream_steps, "--learning_rate", p.downstream_lr,
                    "--per_device_train_batch_size", p.student_batch, "--per_device_eval_batch_size", p.eval_batch,
                    "--max_seq_length", p.max_seq_length, "--warmup_steps", max(1, p.downstream_steps // 10),
                    "--seed", seed, "--save_strategy", "no", "--report_to", "none", "--dataloader_num_workers", 0,
                    *(["--use_cpu", "--no_dataloader_pin_memory"] if not p.gpu else ["--bf16"])]
            settings = {"model": rec["key"], "tasks": tasks["key"], "script": script, "argv": [str(a) for a in argv]}
            label = f"{name}_ft{seed}"

            def work(folder: Path) -> dict:
                self.pipe.command(f"ft_{task}_{label}", script,
                                  [*argv, "--output_dir", folder, "--overwrite_output_dir"])
                # run_ner.py's accuracy is seqeval's: over the words, each scored on its first sub-token
                metrics = json.loads((folder / "eval_results.json").read_text())
                for heavy in folder.glob("model.safetensors"):  # the score is what the report needs, not the model
                    heavy.unlink()
                print(f"  {task} {label}: accuracy {100 * metrics['eval_accuracy']:.1f}%", flush=True)
                return {"accuracy": metrics["eval_accuracy"], "task": task, "seed": seed}

            return self.pipe.unit(f"downstream {task} {label}", self.out / "downstream" / task / label, settings, work,
                                  ("eval_results.json",))

        done = self.pipe.parallel([lambda j=j: one(*j) for j in jobs])
        return {f"{task}/{name}_ft{seed}": d for (task, name, _, _, seed), d in zip(jobs, done)}
