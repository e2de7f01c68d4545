"""Offline quickstart: the whole pipeline end to end on a small machine, ending with a report.

Chains the project's real scripts as a user would, each as its own command (collected in
`<out>/commands.sh`, its full output in `<out>/logs/`), with no model or dataset hub:

  1 corpus      English prose every Python has (the standard library's docstrings via
                scripts/stdlib_corpus.py, plus the prose of pydoc's topic help), or your own text
                (--text); split into train and held-out parts that share no document
  2 tokenizer   a WordPiece tokenizer learnt on the train part, reproducibly (or --tokenizer)
  3 teacher     a small BERT pretrained from scratch: run_mlm.py --do_train
  4 data        scripts/binarized_data.py and scripts/token_counts.py
  5 student     scripts/extract_distilbert.py, the student config and a DIITO neuron mapping (.nm)
  6 students    causal_train.py per seed: standard distillation and DIITO (same init, data, steps),
                and standard distillation given DIITO's compute (steps scaled by the FLOPs per step
                that scripts/count_step_flops.py counts for each objective)
  7 evaluation  run_mlm.py --do_eval on the held-out part, same masking for every model
  8 alignment   run_iia.py on the held-out part: IIA of every student with DIITO's mapping
                (and every block pair, --sweep, for the first seed's standard and DIITO students)
  9 report      <out>/report.md with a table, a verdict and plots (<out>/plots/*.png)

The terminal shows the stage lines, one progress bar for the running command and the final
summary. Each stage writes a `.done` marker last, recording the settings it ran with; a re-run
skips every stage (and every training run) whose marker matches, so an interrupted quickstart
resumes where it stopped. --force redoes everything. The same command gives the same numbers.
How long it takes: README.md, section "Quickstart" (one measured figure, with its machine).

    python scripts/quickstart.py
    python scripts/quickstart.py --preset test --seeds 1 --out /tmp/qs_test
    python scripts/quickstart.py --text my_book.txt --out ./qs_book
    python scripts/quickstart.py --preset gpu         # bigger models, longer runs, --n_gpu 1 --bf16
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from deterministic_wordpiece import train_wordpiece  # noqa: E402
from quickstart_report import LABELS, OBJECTIVES, format_seconds, write_report  # noqa: E402
from utils import REPO_ROOT, CliError, atomic_write_text, logger, run_cli  # noqa: E402

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "PYTHONUNBUFFERED": "1",
}
N_STAGES = 9
PROGRESS = re.compile(rb"(\d+)/(\d+) \[")  # a tqdm bar's `n/total [` in a command's output
MIN_DOCUMENTS = 20  # fewer cannot be split into a training part and a held-out part worth evaluating on
SPLIT_SEED = "quickstart-split-v1"
TEACHER_SEED = 0
EVAL_MASK_SEED = 12345
# The distillation objective of the original recipe (README of Causal-Distill); DIITO adds the causal term.
ALPHAS = {"alpha_ce": 0.25, "alpha_mlm": 0.25, "alpha_cos": 0.25, "alpha_clm": 0.0}
ALPHA_CAUSAL_CE = 0.25


@dataclass(frozen=True)
class Preset:
    """Model sizes and run lengths of one quickstart size."""

    vocab_size: int
    teacher_layers: int
    hidden: int
    heads: int
    ffn: int
    max_seq_length: int
    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    student_layers: int
    student_steps: int
    student_batch: int
    student_lr: float
    eval_batch: int
    iia_pairs: int = 256
    gpu: bool = False
    max_documents: int | None = None


# Sizes measured on a 2-core CPU shared with another job (see the README): a 128-wide teacher gets
# well past the unigram plateau in the time a 256-wide one needs to reach it.
PRESETS = {
    "small": Preset(vocab_size=2000, teacher_layers=4, hidden=128, heads=4, ffn=512, max_seq_length=128,
                    teacher_steps=1200, teacher_batch=32, teacher_lr=2e-3,
                    student_layers=2, student_steps=200, student_batch=32, student_lr=5e-4, eval_batch=64),
    "gpu": Preset(vocab_size=8000, teacher_layers=6, hidden=512, heads=8, ffn=2048, max_seq_length=128,
                  teacher_steps=6000, teacher_batch=128, teacher_lr=5e-4,
                  student_layers=3, student_steps=3000, student_batch=64, student_lr=5e-4, eval_batch=256,
                  iia_pairs=1024, gpu=True),
    "test": Preset(vocab_size=400, teacher_layers=2, hidden=32, heads=2, ffn=64, max_seq_length=64,
                   teacher_steps=20, teacher_batch=16, teacher_lr=2e-3,
                   student_layers=1, student_steps=6, student_batch=8, student_lr=5e-4, eval_batch=64,
                   iia_pairs=32, max_documents=400),
}


# --- corpus ------------------------------------------------------------------------------------
_BULLET = re.compile(r"^(?:[*\-+]|\d+\.|\(\d+\)|[a-z][.)])\s+")
_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")
_NOT_PROSE = re.compile(r">>>|::=|[{}\\|]|-\[")


def clean_topic_paragraph(paragraph: str) -> str | None:
    """One paragraph of `pydoc_data.topics` as a line of prose, or None for code, grammar, tables, headings.

    Prose there is plain text wrapped at 70 columns, sometimes indented as a whole (a method's
    description) or opened by a list bullet; code and grammar blocks have ragged indentation or
    markers such as `>>>` and `::=`.
    """
    lines = [line.rstrip() for line in paragraph.splitlines() if line.strip()]
    if not lines or any(_UNDERLINE.match(line) for line in lines):
        return None
    indents = [len(line) - len(line.lstrip()) for line in lines]
    bullet = _BULLET.match(lines[0].lstrip())
    body_indent = indents[0] + (bullet.end() if bullet else 0)
    if any(indent != body_indent for indent in indents[1:]):
        return None
    text = " ".join(line.strip() for line in lines)
    if bullet:
        text = text[bullet.end():]
    text = re.sub(r"\*\*?([^*]+)\*\*?", r"\1", text)  # *emphasis*
    text = re.sub(r"\s*\[\d+\]", "", text)  # footnote references
    text = re.sub(r"\s+", " ", text).strip()
    if not text or _NOT_PROSE.search(text):
        return None
    if len(text.split()) < 8 or not text[0].isupper() or text[-1] not in ".?!:":
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return text if letters / len(text) > 0.85 else None


def pydoc_topic_documents() -> list[str]:
    """The prose paragraphs of the interpreter's topic help (`pydoc_data.topics`), in topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a trimmed Python without pydoc_data: the docstrings alone will do
        return []
    docs = []
    for name in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            text = clean_topic_paragraph(paragraph)
            if text:
                docs.append(text)
    return docs


def split_documents(text: str) -> list[str]:
    """A user's text as documents: paragraphs separated by blank lines if it has any, else one per line."""
    text = text.replace("\r\n", "\n").strip()
    blocks = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
    return [" ".join(block.split()) for block in blocks if block.strip()]


def read_text_files(paths: list[str]) -> list[str]:
    """The documents of the --text files; CliError for a missing, unreadable or empty file."""
    docs = []
    for name in paths:
        path = Path(name)
        if not path.exists():
            raise CliError(f"--text {name}: no such file")
        if not path.is_file():
            raise CliError(f"--text {name}: not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise CliError(f"--text {name}: not UTF-8 text ({err})") from None
        except OSError as err:
            raise CliError(f"--text {name}: cannot read it ({err.strerror})") from None
        found = split_documents(text)
        if not found:
            raise CliError(f"--text {name} is empty")
        docs.extend(found)
    return docs


def split_corpus(docs: list[str], heldout_fraction: float, source: str) -> tuple[list[str], list[str]]:
    """Deduplicate `docs` and split them into (train, held-out), sharing no document.

    The held-out part is the documents with the smallest hashes, so the split does not depend on
    their order and moves little when a few documents come or go. Raises CliError when there are
    too few documents to split.
    """
    unique = list(dict.fromkeys(docs))
    if len(unique) < MIN_DOCUMENTS:
        raise CliError(
            f"{source}: {len(unique)} distinct document(s), too few to split into a training part and a "
            f"held-out part; give at least {MIN_DOCUMENTS} (one per line, or paragraphs separated by blank lines)"
        )
    n_heldout = max(1, round(len(unique) * heldout_fraction))
    ranked = sorted(unique, key=lambda d: hashlib.sha256(f"{SPLIT_SEED}\n{d}".encode()).hexdigest())
    heldout = set(ranked[:n_heldout])
    return [d for d in unique if d not in heldout], [d for d in unique if d in heldout]


# --- tokenizer ---------------------------------------------------------------------------------
def copy_tokenizer(name: str, out_dir: Path) -> None:
    """Save the --tokenizer (local folder or cached hub name) into `out_dir`; CliError if it cannot serve MLM."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, use_fast=True)
    except Exception as err:  # noqa: BLE001 -- transformers raises many types; all mean "cannot load"
        raise CliError(f"--tokenizer {name}: cannot load it offline ({type(err).__name__}: {err})") from None
    if not getattr(tok, "is_fast", False):
        raise CliError(f"--tokenizer {name}: no fast (Rust) implementation, which scripts/binarized_data.py needs")
    missing = [t for t in ("cls_token", "sep_token", "pad_token", "mask_token", "unk_token") if getattr(tok, t, None) is None]
    if missing:
        raise CliError(f"--tokenizer {name}: lacks {', '.join(missing)}, which a BERT-style masked LM needs")
    tok.save_pretrained(out_dir)


# --- stage bookkeeping -------------------------------------------------------------------------
def fingerprint(settings: dict) -> str:
    """A short stable hash of a stage's settings (upstream fingerprints included)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_marker(folder: Path) -> dict | None:
    """The `.done` record of `folder`, or None if it has none (or an unreadable one)."""
    try:
        return json.loads((folder / ".done").read_text())
    except (OSError, ValueError):
        return None


class StageFailed(Exception):
    """A command of the pipeline exited with an error."""


class Pipeline:
    """Runs stages and commands, skipping what a matching `.done` marker says is finished."""

    def __init__(self, out: Path, force: bool, env: dict[str, str]):
        self.out = out
        self.force = force
        self.env = env
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands = out / "commands.sh"
        self.skipped: list[str] = []
        self.ran: list[str] = []

    def banner(self, k: int, title: str) -> None:
        print(f"\n[stage {k}/{N_STAGES}] {title}", flush=True)

    def complete(self, folder: Path, key: str, outputs: tuple[str, ...] = ()) -> dict | None:
        """The marker of `folder` if it records `key` and every one of `outputs` exists, else None."""
        if self.force:
            return None
        marker = read_marker(folder)
        if marker is None or marker.get("key") != key:
            return None
        if not all((folder / name).exists() for name in outputs):
            return None
        return marker

    def unit(self, name: str, folder: Path, settings: dict, work, outputs: tuple[str, ...] = ()) -> dict:
        """Run `work(folder) -> dict` unless `folder` holds a matching marker; write the marker last.

        The folder is emptied first, so no output of an older run survives into the new one.
        Returns the marker: the key, the settings, the seconds the work took and what it returned.
        """
        key = fingerprint(settings)
        marker = self.complete(folder, key, outputs)
        if marker is not None:
            print(f"  {name}: done already ({format_seconds(marker['seconds'])} on {marker['finished']}); skipping",
                  flush=True)
            self.skipped.append(name)
            return marker
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        start = time.time()
        result = work(folder) or {}
        marker = {"name": name, "key": key, "settings": settings, "seconds": round(time.time() - start, 2),
                  "finished": dt.datetime.now().isoformat(timespec="seconds"), **result}
        atomic_write_text(folder / ".done", json.dumps(marker, indent=2, default=str))
        self.ran.append(name)
        return marker

    def command(self, log_name: str, script: str, args: list[str]) -> float:
        """Run `python <script> <args>` from the repository root, its whole output to `logs/<log_name>.log`.

        The terminal shows one progress bar for it, fed by the progress counts (`n/total`) the
        command prints. Returns the wall time in seconds; raises StageFailed on a non-zero exit.
        """
        from tqdm import tqdm

        argv = [sys.executable, script, *map(str, args)]
        shown = shlex.join(["python", script, *map(str, args)])
        with open(self.commands, "a", encoding="utf-8") as fh:
            fh.write(shown + "\n")
        log_path = self.logs / f"{log_name}.log"
        start = time.time()
        bar = tqdm(total=None, desc=f"  {log_name}", leave=False, dynamic_ncols=True, file=sys.stderr, disable=None,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
        with open(log_path, "wb") as log:
            log.write(f"$ {shown}\n".encode())
            proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=self.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            try:
                while chunk := os.read(proc.stdout.fileno(), 65536):
                    log.write(chunk)
                    found = PROGRESS.findall(chunk)
                    if found:
                        done, total = (int(x) for x in found[-1])
                        if bar.total != total:
                            bar.reset(total=total)
                        bar.n = min(done, total)
                        bar.refresh()
                rc = proc.wait()
            except BaseException:
                proc.terminate()
                proc.wait()
                raise
            finally:
                bar.close()
        if rc != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise StageFailed(f"{script} exited with status {rc}; its output is in {log_path}, ending with:\n"
                              + "\n".join("    " + line[-300:] for line in tail) + f"\nThe command was:\n  {shown}")
        return time.time() - start


# --- the quickstart ----------------------------------------------------------------------------
class Quickstart:
    def __init__(self, args: argparse.Namespace, preset: Preset, user_docs: list[str] | None):
        self.args = args
        self.preset = preset
        self.user_docs = user_docs
        self.out = Path(args.out).resolve()
        self.seeds = list(range(1, args.seeds + 1))
        env = dict(os.environ, **OFFLINE_ENV)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        self.pipe = Pipeline(self.out, args.force, env)
        self.device_args = ["--n_gpu", "1", "--bf16"] if preset.gpu else ["--n_gpu", "0"]
        self.trainer_device_args = ["--bf16"] if preset.gpu else ["--use_cpu", "--no_dataloader_pin_memory"]

    # 1
    def corpus(self) -> dict:
        p, args = self.preset, self.args
        self.pipe.banner(1, "corpus: real English prose, split into train and held-out parts")
        if self.user_docs is not None:
            source = {"text": [str(Path(t).resolve()) for t in args.text],
                      "sha256": hashlib.sha256("\n".join(self.user_docs).encode()).hexdigest()}
        else:
            source = {"stdlib": sys.version, "max_documents": p.max_documents}
        settings = {"source": source, "heldout_fraction": args.heldout_fraction, "split": SPLIT_SEED}

        def work(folder: Path) -> dict:
            if self.user_docs is not None:
                docs, origin = self.user_docs, "your --text files: " + ", ".join(args.text)
            else:
                stdlib = folder / "stdlib_docstrings.txt"
                self.pipe.command("corpus_stdlib", "scripts/stdlib_corpus.py", ["--out", stdlib])
                docs = stdlib.read_text(encoding="utf-8").splitlines()
                topics = pydoc_topic_documents()
                atomic_write_text(folder / "pydoc_topics.txt", "\n".join(topics) + "\n")
                docs += topics
                if p.max_documents:
                    docs = docs[: p.max_documents]
                origin = (f"the standard library's docstrings (scripts/stdlib_corpus.py) and the prose of "
                          f"pydoc's topic help ({len(topics)} paragraphs), Python {platform.python_version()}")
            train, heldout = split_corpus(docs, args.heldout_fraction, "the corpus")
            atomic_write_text(folder / "train.txt", "\n".join(train) + "\n")
            atomic_write_text(folder / "heldout.txt", "\n".join(heldout) + "\n")
            stats = {"origin": origin, "train_documents": len(train), "heldout_documents": len(heldout),
                     "train_words": sum(len(d.split()) for d in train),
                     "heldout_words": sum(len(d.split()) for d in heldout)}
            print(f"  {stats['train_documents']} training documents ({stats['train_words']} words), "
                  f"{stats['heldout_documents']} held-out documents ({stats['heldout_words']} words)", flush=True)
            return stats

        return self.pipe.unit("corpus", self.out / "corpus", settings, work, ("train.txt", "heldout.txt"))

    # 2
    def tokenizer(self, corpus: dict) -> dict:
        self.pipe.banner(2, "tokenizer: " + (f"--tokenizer {self.args.tokenizer}" if self.args.tokenizer
                                              else f"WordPiece ({self.preset.vocab_size} entries) on the train part"))
        settings = {"corpus": corpus["key"], "vocab_size": self.preset.vocab_size, "tokenizer": self.args.tokenizer}

        def work(folder: Path) -> dict:
            os.environ.update(OFFLINE_ENV)
            if self.args.tokenizer:
                copy_tokenizer(self.args.tokenizer, folder)
            else:
                lines = (self.out / "corpus" / "train.txt").read_text(encoding="utf-8").splitlines()
                train_wordpiece(lines, folder, self.preset.vocab_size)
            saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
            size = len(set(saved["model"]["vocab"]) | {t["content"] for t in saved.get("added_tokens", [])})
            print(f"  {size} entries, saved to {folder}", flush=True)
            return {"vocab_size": size}

        return self.pipe.unit("tokenizer", self.out / "tokenizer", settings, work, ("tokenizer.json",))

    # 3
    def teacher(self, corpus: dict, tokenizer: dict) -> dict:
        p = self.preset
        steps = self.args.teacher_steps or p.teacher_steps
        self.pipe.banner(3, f"teacher: BERT {p.teacher_layers} layers x {p.hidden} from scratch, {steps} steps "
                            f"(run_mlm.py --do_train)")
        overrides = (f"num_hidden_layers={p.teacher_layers},hidden_size={p.hidden},num_attention_heads={p.heads},"
                     f"intermediate_size={p.ffn},max_position_embeddings={p.max_seq_length}")
        argv = [
            "--model_type", "bert", "--config_overrides", overrides,
            "--tokenizer_name", self.out / "tokenizer", "--train_file", self.out / "corpus" / "train.txt",
            "--line_by_line", "--max_seq_length", p.max_seq_length,
            "--do_train", "--max_steps", steps, "--per_device_train_batch_size", p.teacher_batch,
            "--learning_rate", p.teacher_lr, "--warmup_steps", max(1, steps // 16), "--weight_decay", 0.01,
            "--adam_beta2", 0.98, "--train_sampling_strategy", "group_by_length",
            "--logging_steps", max(1, steps // 40), "--save_strategy", "no", "--report_to", "none",
            "--seed", TEACHER_SEED, "--dataloader_num_workers", 0, *self.trainer_device_args,
        ]
        settings = {"corpus": corpus["key"], "tokenizer": tokenizer["key"], "argv": [str(a) for a in argv]}

        def work(folder: Path) -> dict:
            seconds = self.pipe.command("teacher", "run_mlm.py", [*argv, "--output_dir", folder, "--overwrite_output_dir"])
            return {"train_seconds": round(seconds, 2), "steps": steps}

        return self.pipe.unit("teacher", self.out / "teacher", settings, work, ("model.safetensors", "config.json"))

    # 4
    def data(self, corpus: dict, tokenizer: dict) -> dict:
        self.pipe.banner(4, "data: binarize the train part and count its tokens "
                            "(scripts/binarized_data.py, scripts/token_counts.py)")
        settings = {"corpus": corpus["key"], "tokenizer": tokenizer["key"]}

        def work(folder: Path) -> dict:
            self.pipe.command("binarize", "scripts/binarized_data.py", [
                "--file_path", self.out / "corpus" / "train.txt", "--tokenizer_type", "bert",
                "--tokenizer_name", self.out / "tokenizer", "--dump_file", folder / "binarized_text", "--seed", 0])
            found = sorted(folder.glob("binarized_text.*.bin"))
            if len(found) != 1:
                raise StageFailed(f"scripts/binarized_data.py left {len(found)} .bin files in {folder}, expected one")
            self.pipe.command("token_counts", "scripts/token_counts.py", [
                "--data_file", found[0], "--token_counts_dump", folder / "token_counts.pickle"])
            return {"data_file": found[0].name}

        return self.pipe.unit("data", self.out / "data", settings, work, ("token_counts.pickle",))

    # 5
    def student_init(self, teacher: dict) -> dict:
        p = self.preset
        self.pipe.banner(5, f"student initialisation: {p.student_layers} of the teacher's {p.teacher_layers} blocks "
                            f"(scripts/extract_distilbert.py), config and DIITO mapping")
        settings = {"teacher": teacher["key"], "student_layers": p.student_layers}

        def work(folder: Path) -> dict:
            weights = folder / "student_init.pth"
            self.pipe.command("extract", "scripts/extract_distilbert.py", [
                "--model_type", "bert", "--model_name", self.out / "teacher", "--dump_checkpoint", weights,
                "--num_layers", p.student_layers, "--vocab_transform"])
            record = json.loads(weights.with_name(weights.name + ".json").read_text())
            atomic_write_text(folder / "student_config.json", json.dumps(record["student_config"], indent=2) + "\n")
            atomic_write_text(folder / "diito.nm", json.dumps(neuron_mapping(record["teacher_layers"], p.heads,
                                                                             p.hidden // p.heads), indent=2) + "\n")
            print(f"  student block i <- teacher block {record['teacher_layers']}; DIITO aligns the outputs of "
                  f"each pair, full width ({folder / 'diito.nm'})", flush=True)
            return {"teacher_layers": record["teacher_layers"]}

        return self.pipe.unit("student_init", self.out / "student_init", settings, work,
                              ("student_init.pth", "student_config.json", "diito.nm"))

    # 6
    def students(self, data: dict, init: dict) -> tuple[dict, dict[str, dict]]:
        """Standard and DIITO runs of `steps` steps per seed, then standard runs given a DIITO run's FLOPs."""
        p = self.preset
        steps = self.args.steps or p.student_steps
        self.pipe.banner(6, f"students: causal_train.py, standard and DIITO ({steps} steps each) and standard at "
                            f"DIITO's compute, seeds {', '.join(map(str, self.seeds))} ({3 * len(self.seeds)} runs)")
        common = [
            "--data_file", self.out / "data" / data["data_file"],
            "--token_counts", self.out / "data" / "token_counts.pickle",
            "--student_type", "distilbert", "--student_config", self.out / "student_init" / "student_config.json",
            "--student_pretrained_weights", self.out / "student_init" / "student_init.pth",
            "--teacher_type", "bert", "--teacher_name", self.out / "teacher", "--tokenizer_name", self.out / "tokenizer",
            "--mlm", *[x for k, v in ALPHAS.items() for x in (f"--{k}", v)],
            "--interchange_prop", 0.3, "--interchange_consecutive_only", "--freeze_pos_embs",
            "--n_epoch", 1000, "--batch_size", p.student_batch,
            "--gradient_accumulation_steps", 1, "--learning_rate", p.student_lr, "--warmup_prop", 0.05,
            "--group_by_size", "--checkpoint_interval", 0,
            "--save_total_limit", 1, "--num_workers", 0, *self.device_args,
        ]
        causal = {"standard": ["--alpha_causal_ce", 0.0],
                  "diito": ["--alpha_causal_ce", ALPHA_CAUSAL_CE, "--neuron_mapping", self.out / "student_init" / "diito.nm"]}

        # FLOPs per step of each objective, counted on the first seed's first batches (shapes only: no timing).
        def count(folder: Path) -> dict:
            result = {}
            for objective in ("standard", "diito"):
                self.pipe.command(f"flops_{objective}", "scripts/count_step_flops.py", [
                    "--out", folder / f"{objective}.json", "--batches", 4, "--",
                    *common, *causal[objective], "--max_steps", steps, "--seed", self.seeds[0], "--no_progress"])
                result[objective] = json.loads((folder / f"{objective}.json").read_text())["flops_per_step"]
            result["ratio"] = result["diito"] / result["standard"]
            print(f"  FLOPs per step: standard {result['standard'] / 1e9:.3g} G, DIITO {result['diito'] / 1e9:.3g} G "
                  f"(ratio {result['ratio']:.2f})", flush=True)
            return result

        flops = self.pipe.unit("flops", self.out / "flops", {"data": data["key"], "init": init["key"],
                                                            "argv": [str(a) for a in common], "steps": steps},
                               count, ("standard.json", "diito.json"))
        steps_of = {"standard": steps, "diito": steps, "standard_eqc": max(1, round(steps * flops["ratio"]))}
        runs = [(objective, seed) for objective in OBJECTIVES for seed in self.seeds]
        records = {}
        for i, (objective, seed) in enumerate(runs, 1):
            name = f"{objective}_seed{seed}"
            n = steps_of[objective]
            argv = [*common, *causal["diito" if objective == "diito" else "standard"], "--max_steps", n,
                    "--log_interval", max(1, n // 25), "--seed", seed]
            settings = {"data": data["key"], "init": init["key"], "argv": [str(a) for a in argv]}

            def work(folder: Path, argv=argv, name=name, objective=objective, seed=seed, n=n) -> dict:
                seconds = self.pipe.command(f"student_{name}", "causal_train.py",
                                            ["--dump_path", folder, "--force", *argv])
                for checkpoint in folder.glob("checkpoint-*"):  # the final student is what the report needs
                    shutil.rmtree(checkpoint, ignore_errors=True)
                print(f"  run {i}/{len(runs)}: {LABELS[objective]}, seed {seed}, {n} steps: "
                      f"{format_seconds(seconds)}", flush=True)
                return {"train_seconds": round(seconds, 2), "objective": objective, "seed": seed, "steps": n}

            records[name] = self.pipe.unit(name, self.out / "students" / name, settings, work,
                                           ("model.safetensors", "config.json"))
        return flops, records

    # 7
    def evaluate(self, teacher: dict, students: dict[str, dict]) -> dict[str, dict]:
        p = self.preset
        models = {"teacher": (self.out / "teacher", teacher)}
        models.update({name: (self.out / "students" / name, rec) for name, rec in students.items()})
        self.pipe.banner(7, f"evaluation: held-out perplexity of {len(models)} models (run_mlm.py --do_eval, "
                            f"--eval_mask_seed {EVAL_MASK_SEED}, --max_seq_length {p.max_seq_length})")
        common = [
            "--tokenizer_name", self.out / "tokenizer", "--validation_file", self.out / "corpus" / "heldout.txt",
            "--line_by_line", "--max_seq_length", p.max_seq_length, "--do_eval",
            "--per_device_eval_batch_size", p.eval_batch, "--eval_mask_seed", EVAL_MASK_SEED, "--seed", 0,
            "--report_to", "none", "--dataloader_num_workers", 0,
            *(["--use_cpu", "--no_dataloader_pin_memory"] if not p.gpu else []),
        ]
        records = {}
        for name, (model_dir, model_record) in models.items():
            argv = ["--model_name_or_path", model_dir, *common]
            settings = {"model": model_record["key"], "argv": [str(a) for a in argv]}

            def work(folder: Path, argv=argv, name=name) -> dict:
                self.pipe.command(f"eval_{name}", "run_mlm.py", [*argv, "--output_dir", folder])
                metrics = json.loads((folder / "eval_results.json").read_text())
                print(f"  {name}: held-out perplexity {metrics['perplexity']:.2f}", flush=True)
                return {"perplexity": metrics["perplexity"], "eval_loss": metrics["eval_loss"],
                        "eval_samples": metrics.get("eval_samples")}

            records[name] = self.pipe.unit(f"eval {name}", self.out / "eval" / name, settings, work,
                                           ("eval_results.json",))
        return records

    # 8
    def alignment(self, teacher: dict, init: dict, students: dict[str, dict]) -> dict[str, dict]:
        p = self.preset
        self.pipe.banner(8, f"alignment: IIA of {len(students)} students with the teacher (run_iia.py, DIITO's "
                            f"mapping, {p.iia_pairs} held-out pairs; every block pair for seed {self.seeds[0]})")
        common = [
            "--teacher_name", self.out / "teacher", "--tokenizer_name", self.out / "tokenizer",
            "--neuron_mapping", self.out / "student_init" / "diito.nm",
            "--data_file", self.out / "corpus" / "heldout.txt", "--max_seq_length", p.max_seq_length,
            "--num_pairs", p.iia_pairs, "--seed", 0, "--batch_size", 64,
            "--interchange_prop", 0.3, "--interchange_consecutive_only",
            *(["--device", "cuda", "--bf16"] if p.gpu else ["--device", "cpu"]),
        ]
        records = {}
        for name, rec in students.items():
            sweep = ["--sweep"] if rec["seed"] == self.seeds[0] and rec["objective"] in ("standard", "diito") else []
            argv = ["--student_name", self.out / "students" / name, *common, *sweep]
            settings = {"model": rec["key"], "teacher": teacher["key"], "init": init["key"],
                        "argv": [str(a) for a in argv]}

            def work(folder: Path, argv=argv, name=name) -> dict:
                self.pipe.command(f"iia_{name}", "run_iia.py", [*argv, "--output_dir", folder])
                overall = json.loads((folder / "iia_results.json").read_text())["mapping"]["overall"]
                print(f"  {name}: IIA {100 * overall['iia']['value']:.1f}%, effective IIA "
                      f"{100 * overall['effective_iia']['value']:.1f}%", flush=True)
                return {"iia": overall["iia"]["value"], "iia_ci95": overall["iia"]["ci95"],
                        "effective_iia": overall["effective_iia"]["value"]}

            records[name] = self.pipe.unit(f"iia {name}", self.out / "iia" / name, settings, work,
                                           ("iia_results.json",))
        return records

    # 9
    def report(self, stages: dict, students: dict, evals: dict, alignment: dict) -> dict:
        self.pipe.banner(9, "report: table, verdict and plots")
        # Keyed on when each input was made too, so that anything redone upstream is reported afresh.
        settings = {group: {k: (v["key"], v["finished"]) for k, v in records.items()}
                    for group, records in (("stages", stages), ("students", students), ("evals", evals),
                                           ("alignment", alignment))}
        settings["version"] = 4

        def work(folder: Path) -> dict:
            summary = write_report(self.out, self.preset, self.args, stages, students, evals, alignment, self.seeds)
            print(f"  {self.out / 'report.md'}", flush=True)
            return {"verdict": summary["verdict"]}

        return self.pipe.unit("report", self.out / "plots", settings, work,
                              ("heldout_perplexity.png", "training_losses.png", "iia_heatmaps.png", "../report.md",
                               "../summary.json"))

    def run(self) -> dict:
        start = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.pipe.commands, "a", encoding="utf-8") as fh:
            fh.write(f"# quickstart {dt.datetime.now().isoformat(timespec='seconds')}: "
                     f"{shlex.join(['python', 'scripts/quickstart.py', *sys.argv[1:]])}\n"
                     f"cd {shlex.quote(str(REPO_ROOT))}\n"
                     + "".join(f"export {k}={v}\n" for k, v in OFFLINE_ENV.items())
                     + f"export OMP_NUM_THREADS={self.args.threads} MKL_NUM_THREADS={self.args.threads}\n")
        stages = {}
        stages["corpus"] = corpus = self.corpus()
        stages["tokenizer"] = tokenizer = self.tokenizer(corpus)
        stages["teacher"] = teacher = self.teacher(corpus, tokenizer)
        stages["data"] = data = self.data(corpus, tokenizer)
        stages["student_init"] = init = self.student_init(teacher)
        stages["flops"], students = self.students(data, init)
        evals = self.evaluate(teacher, students)
        alignment = self.alignment(teacher, init, students)
        report = self.report(stages, students, evals, alignment)
        elapsed = time.time() - start
        print(f"\nquickstart finished in {format_seconds(elapsed)} "
              f"(ran {len(self.pipe.ran)}, skipped {len(self.pipe.skipped)} found done already)")
        print((self.out / "report_table.md").read_text(encoding="utf-8"))
        print(report["verdict"])
        print(f"report: {self.out / 'report.md'}; full output of every command: {self.out / 'logs'}")
        return {"seconds": elapsed, "ran": self.pipe.ran, "skipped": self.pipe.skipped}


def neuron_mapping(teacher_layers: list[int], heads: int, head_dim: int) -> dict:
    """A DIITO mapping that aligns the output of student block i with that of the teacher block copied into it."""
    width = f"$H:[0:{heads}]$[0:{head_dim}]"
    return {"interchange_variable_mappings": [
        {"teacher_variable_names": [f"$L:{t}{width}"], "student_variable_names": [f"$L:{i}{width}"]}
        for i, t in enumerate(teacher_layers)
    ]}


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="./quickstart_out", help="Output folder (default: ./quickstart_out).")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="small (default): the size measured in README.md, section Quickstart; gpu: bigger models and "
                             "longer runs with --n_gpu 1 --bf16; test: the smallest size, for the test suite.")
    parser.add_argument("--family", choices=("bert", "llama", "gpt2"), default="bert",
                        help="Teacher family: bert (masked LM, the default), or a causal LM, llama or gpt2 "
                             "(run_clm.py; scripts/quickstart_clm.py).")
    parser.add_argument("--seeds", type=int, default=3, help="Seeds per objective (default 3).")
    parser.add_argument("--steps", type=int, default=None, help="Optimiser steps per student run (default: the preset's).")
    parser.add_argument("--teacher_steps", type=int, default=None, help="Teacher training steps (default: the preset's).")
    parser.add_argument("--text", nargs="+", default=None, metavar="FILE",
                        help="Your own corpus instead of the standard library's prose: UTF-8 text files, "
                             "paragraphs separated by blank lines (if a file has any) or one document per line.")
    parser.add_argument("--tokenizer", default=None,
                        help="Use this tokenizer (local folder, or a hub name already in the cache) instead of "
                             "training one.")
    parser.add_argument("--heldout_fraction", type=float, default=0.1, help="Share of documents held out (default 0.1).")
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="Threads per training process (default: half the cores; two processes fighting "
                             "over the same cores run several times slower).")
    parser.add_argument("--force", action="store_true", help="Redo every stage, even those already done.")
    args = parser.parse_args(argv)
    for flag in ("seeds", "steps", "teacher_steps", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag} must be at least 1, got {value}")
    if not 0.0 < args.heldout_fraction <= 0.5:
        raise CliError(f"--heldout_fraction must lie in (0, 0.5], got {args.heldout_fraction}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise CliError(f"--out {args.out} is a file, not a folder")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run the quickstart as `argv` asks; returns what ran, what was skipped and the wall time."""
    args = parse_args(argv)
    if args.family == "bert":
        preset = PRESETS[args.preset]
    else:
        import quickstart_clm

        preset = quickstart_clm.checked_preset(args.preset, args.family)
    user_docs = None
    if args.text:  # bad input fails here, before anything is written or trained
        user_docs = read_text_files(args.text)
        split_corpus(user_docs, args.heldout_fraction, "--text " + " ".join(args.text))
        if preset.max_documents:
            preset = replace(preset, max_documents=None)
    if args.tokenizer and args.tokenizer.startswith((".", "/", "~")) and not Path(args.tokenizer).expanduser().exists():
        raise CliError(f"--tokenizer {args.tokenizer}: no such folder")
    if preset.gpu:
        import torch

        if not torch.cuda.is_available():
            raise CliError("--preset gpu trains with --n_gpu 1 --bf16 and needs a CUDA GPU, which torch does not see "
                           "here; use --preset small on a CPU")
    os.environ.update(OFFLINE_ENV)

    try:
        if args.family == "bert":
            return Quickstart(args, preset, user_docs).run()
        return quickstart_clm.ClmQuickstart(args, preset, user_docs).run()
    except StageFailed as err:
        logger.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
