#!/usr/bin/env python
"""Local stand-ins for `scripts/reproduce.py --preset tiny`: everything the paper's chain reads from
the hub, made small and offline, so that every stage of the chain can run on a CPU in minutes.

Writes into --out:

  tokenizer/            a BERT-style uncased WordPiece tokenizer over a closed word list (every word
                        of the generated language is one entry, so tokenization is exact and the
                        same on every machine)
  teacher_config.json   a BertForMaskedLM config with BERT-base's depth and heads (12 x 12, so the
                        shipped .nm files keep their layer and head numbers) but 4 dimensions per
                        head; scripts/reproduce.py trains the teacher from it with run_mlm.py
  text/train.txt        the distillation corpus, one document per line (stands for WikiText-103)
  text/validation.txt   held-out documents (perplexity and IIA; stands for WikiText-103's validation)
  glue/<task>/          train.csv and dev.csv with the task's columns and label ids, for the nine
                        GLUE tasks (mnli also dev_mismatched.csv)
  conll2003/            train.json and validation.json (json lines: tokens, ner_tags as strings)
  squad/                train.json and dev.json in the official nested SQuAD v1.1 format
  standins.json         what was written, with the sizes

The language is generated from templates over a small vocabulary of names, places, organisations,
nouns, verbs and adjectives, seeded by --seed. Each task's label is a function of its text (the
sentiment of an adjective, whether two sentences share their content, which entity a question
asks for), so a model can learn something; the point is that the chain runs, not the scores.

    python scripts/reproduce_tiny.py --out /tmp/standins
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import random
from pathlib import Path

from atomic_files import atomic_write_text
from utils import CliError, logger, run_cli


PERSONS = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "oscar"]
PLACES = ["paris", "london", "rome", "berlin", "madrid", "vienna", "oslo", "lisbon", "dublin", "prague"]
ORGS = ["acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "cyberdyne"]
MISC = ["french", "german", "english", "italian", "spanish", "dutch"]
NOUNS = ["cat", "dog", "bird", "horse", "book", "house", "garden", "river", "car", "tree", "song", "letter",
         "train", "market", "bridge", "painting", "boat", "castle", "lamp", "coat"]
VERBS = ["saw", "liked", "found", "painted", "visited", "bought", "sold", "watched", "heard", "wrote", "kept", "moved"]
POSITIVE = ["good", "great", "happy", "lovely", "wonderful", "bright", "kind", "pleasant"]
NEGATIVE = ["bad", "awful", "sad", "terrible", "dull", "broken", "cruel", "ugly"]
FUNCTION = ["the", "a", "in", "on", "with", "and", "but", "was", "is", "not", "very", "who", "what", "where",
            "did", "of", "to", "near", "from", "by", "he", "she", "it", "they", "then", "also", "which", "does"]
PUNCTUATION = [".", ",", "?", "!", "'", "-"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
ADJECTIVES = POSITIVE + NEGATIVE
GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")


def vocabulary() -> list[str]:
    """Every entry of the tokenizer, specials first: the ids are fixed by this order."""
    words = PERSONS + PLACES + ORGS + MISC + NOUNS + VERBS + ADJECTIVES + FUNCTION + PUNCTUATION
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    pieces = ["##" + ch for ch in letters]  # anything outside the word list still tokenizes, letter by letter
    seen = dict.fromkeys(SPECIALS + words + letters + pieces)
    return list(seen)


def write_tokenizer(folder: Path) -> int:
    """A BertTokenizerFast over `vocabulary()` saved in `folder`; returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertTokenizerFast

    vocab = {token: i for i, token in enumerate(vocabulary())}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    fast = BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, model_max_length=64, unk_token="[UNK]",
                             sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return len(vocab)


class Language:
    """Seeded sentence generator over the word lists."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def pick(self, words: list[str]) -> str:
        return self.rng.choice(words)

    def clause(self, adjective: str | None = None, person: str | None = None, place: str | None = None) -> list[str]:
        """One sentence as (word, tag) pairs flattened to words; tags come from `tagged_clause`."""
        return [w for w, _ in self.tagged_clause(adjective, person, place)]

    def tagged_clause(self, adjective: str | None = None, person: str | None = None,
                      place: str | None = None) -> list[tuple[str, str]]:
        """One sentence with CoNLL tags (O, B-PER, B-LOC, B-ORG, B-MISC)."""
        adj = adjective or self.pick(ADJECTIVES)
        per = person or self.pick(PERSONS)
        loc = place or self.pick(PLACES)
        template = self.rng.randrange(4)
        if template == 0:
            words = [(per, "B-PER"), (self.pick(VERBS), "O"), ("the", "O"), (adj, "O"), (self.pick(NOUNS), "O"),
                     ("in", "O"), (loc, "B-LOC"), (".", "O")]
        elif template == 1:
            words = [("the", "O"), (self.pick(NOUNS), "O"), ("of", "O"), (self.pick(ORGS), "B-ORG"), ("in", "O"),
                     (loc, "B-LOC"), ("was", "O"), ("very", "O"), (adj, "O"), (".", "O")]
        elif template == 2:
            words = [(per, "B-PER"), ("and", "O"), (self.pick(PERSONS), "B-PER"), (self.pick(VERBS), "O"), ("a", "O"),
                     (adj, "O"), (self.pick(MISC), "B-MISC"), (self.pick(NOUNS), "O"), (".", "O")]
        else:
            words = [("in", "O"), (loc, "B-LOC"), (",", "O"), (per, "B-PER"), (self.pick(VERBS), "O"), ("the", "O"),
                     (adj, "O"), (self.pick(NOUNS), "O"), ("with", "O"), (self.pick(ORGS), "B-ORG"), (".", "O")]
        return words

    def document(self) -> str:
        return " ".join(w for _ in range(self.rng.randint(2, 5)) for w in self.clause())

    def sentence(self, **kw) -> str:
        return " ".join(self.clause(**kw))


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def glue_example(task: str, lang: Language) -> dict:
    """One labelled example of `task` with the hub's columns; labels are ids in the hub's order."""
    rng = lang.rng
    if task in ("sst2", "cola"):
        if task == "sst2":
            positive = rng.random() < 0.5
            return {"sentence": lang.sentence(adjective=lang.pick(POSITIVE if positive else NEGATIVE)),
                    "label": int(positive)}
        words = lang.clause()
        acceptable = rng.random() < 0.5
        if not acceptable:
            rng.shuffle(words)
        return {"sentence": " ".join(words), "label": int(acceptable)}
    a = lang.clause()
    same = rng.random() < 0.5
    if same:  # a paraphrase: the same sentence with one adjective swapped for one of the same polarity
        b = list(a)
        for i, w in enumerate(b):
            if w in ADJECTIVES:
                b[i] = lang.pick(POSITIVE if w in POSITIVE else NEGATIVE)
    else:
        b = lang.clause()
    s1, s2 = " ".join(a), " ".join(b)
    if task == "mrpc":
        return {"sentence1": s1, "sentence2": s2, "label": int(same)}
    if task == "qqp":
        return {"question1": "what " + s1[:-1] + " ?", "question2": "what " + s2[:-1] + " ?", "label": int(same)}
    if task == "stsb":
        overlap = len(set(a) & set(b)) / len(set(a) | set(b))
        return {"sentence1": s1, "sentence2": s2, "label": round(5.0 * overlap, 2)}
    if task == "mnli":
        label = rng.randrange(3)  # entailment, neutral, contradiction
        if label == 0:
            hypothesis = s1
        elif label == 1:
            hypothesis = s2 if not same else lang.sentence()
        else:
            hypothesis = " ".join(w if w not in ADJECTIVES else lang.pick(NEGATIVE if w in POSITIVE else POSITIVE)
                                  for w in a)
        return {"premise": s1, "hypothesis": hypothesis, "label": label}
    if task == "qnli":
        person = lang.pick(PERSONS)
        answers = rng.random() < 0.5
        sentence = lang.sentence(person=person if answers else lang.pick([p for p in PERSONS if p != person]))
        return {"question": f"who did it with {person} ?", "sentence": sentence, "label": 0 if answers else 1}
    if task in ("rte", "wnli"):
        entails = same
        label = (0 if entails else 1) if task == "rte" else int(entails)  # rte: entailment=0; wnli: entailment=1
        return {"sentence1": s1, "sentence2": s2, "label": label}
    raise ValueError(task)


def squad_article(lang: Language, index: int, n_questions: int) -> dict:
    """One nested-SQuAD article: a paragraph of clauses and questions whose answers are spans of it."""
    clauses = [lang.clause() for _ in range(3)]
    context = " ".join(" ".join(c) for c in clauses)
    qas = []
    for q in range(n_questions):
        clause = clauses[q % len(clauses)]
        person = next((w for w in clause if w in PERSONS), None)
        place = next((w for w in clause if w in PLACES), None)
        answer, question = (person, "who " + " ".join(w for w in clause if w != person)[:-2] + " ?") if person else \
            (place, "where " + " ".join(w for w in clause if w != place)[:-2] + " ?")
        if answer is None:
            continue
        sentence_start = context.index(" ".join(clause))
        start = sentence_start + " ".join(clause).index(answer)
        qas.append({"id": f"q{index}_{q}", "question": question,
                    "answers": [{"text": answer, "answer_start": start}]})
    return {"title": f"article {index}", "paragraphs": [{"context": context, "qas": qas}]}


def write_standins(out: Path, seed: int, documents: int, heldout: int, task_train: int, task_dev: int) -> dict:
    """Write every stand-in into `out` (see the module docstring); returns the record written to standins.json."""
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(out / "tokenizer")
    teacher = {
        "model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": vocab_size,
        "hidden_size": 48, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 96,
        "max_position_embeddings": 64, "type_vocab_size": 2, "hidden_act": "gelu", "pad_token_id": 0,
        "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
    }
    atomic_write_text(out / "teacher_config.json", json.dumps(teacher, indent=2) + "\n")

    lang = Language(seed)
    docs = list(dict.fromkeys(lang.document() for _ in range(documents + heldout)))
    atomic_write_text(out / "text" / "train.txt", "\n".join(docs[:-heldout]) + "\n")
    atomic_write_text(out / "text" / "validation.txt", "\n".join(docs[-heldout:]) + "\n")

    for task in GLUE_TASKS:
        splits = {"train": task_train, "dev": task_dev}
        if task == "mnli":
            splits["dev_mismatched"] = task_dev
        for split, n in splits.items():
            task_lang = Language(_stable_seed(seed, task, split))
            atomic_write_text(out / "glue" / task / f"{split}.csv", _csv([glue_example(task, task_lang) for _ in range(n)]))

    for split, n in (("train", task_train), ("validation", task_dev)):
        ner_lang = Language(_stable_seed(seed, "conll2003", split))
        lines = []
        for _ in range(n):
            pairs = ner_lang.tagged_clause()
            lines.append(json.dumps({"tokens": [w for w, _ in pairs], "ner_tags": [t for _, t in pairs]}))
        atomic_write_text(out / "conll2003" / f"{split}.json", "\n".join(lines) + "\n")

    for split, n in (("train", task_train), ("dev", task_dev)):
        qa_lang = Language(_stable_seed(seed, "squad", split))
        articles = [squad_article(qa_lang, i, 3) for i in range(max(1, n // 3))]
        atomic_write_text(out / "squad" / f"{split}.json", json.dumps({"version": "1.1", "data": articles}) + "\n")

    record = {"seed": seed, "vocab_size": vocab_size, "train_documents": len(docs) - heldout,
              "validation_documents": heldout,
              "train_words": sum(len(d.split()) for d in docs[:-heldout]),
              "task_examples": {"train": task_train, "dev": task_dev}, "teacher_config": teacher}
    atomic_write_text(out / "standins.json", json.dumps(record, indent=2) + "\n")
    return record


def _stable_seed(seed: int, *parts: str) -> int:
    """A seed for one split of one task that does not depend on Python's hash randomisation."""
    import hashlib

    return int(hashlib.sha256(repr((seed, *parts)).encode()).hexdigest()[:8], 16)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Folder to write the stand-ins into (created).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generated language (default 0).")
    parser.add_argument("--documents", type=int, default=1500, help="Training documents (default 1500).")
    parser.add_argument("--heldout", type=int, default=150, help="Held-out documents (default 150).")
    parser.add_argument("--task_train", type=int, default=64, help="Training examples per task (default 64).")
    parser.add_argument("--task_dev", type=int, default=32, help="Evaluation examples per task (default 32).")
    args = parser.parse_args(argv)
    for flag in ("documents", "heldout", "task_train", "task_dev"):
        if getattr(args, flag) < 4:
            raise CliError(f"--{flag} must be at least 4, got {getattr(args, flag)}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a folder")
    record = write_standins(out, args.seed, args.documents, args.heldout, args.task_train, args.task_dev)
    logger.info("wrote the tiny stand-ins to %s: %d training documents (%d words), %d held-out, tokenizer of %d "
                "entries, %d/%d examples per task", out, record["train_documents"], record["train_words"],
                record["validation_documents"], record["vocab_size"], args.task_train, args.task_dev)
    return record


if __name__ == "__main__":
    run_cli(main)
