"""The quickstart's pipeline: what the masked-LM (BERT) and causal-LM quickstarts share.

The corpus (shipped in data/, or --text) and its split into train, validation and test parts, the stage bookkeeping (`Pipeline`: `.done` markers, commands with a
progress bar and a log each), the presets, and the stages whose shape is the same for both families
(`Quickstart`: corpus, tokenizer, teacher, data, student initialisation, one student run,
evaluation, the run itself). Each family (pipelines/quickstart/mlm.py for BERT, pipelines/quickstart/clm.py
for Llama and GPT-2) names its scripts, flags and settings and adds its own stages.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shlex
import shutil
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from doc_corpus import CorpusError, shipped_corpus
from pipelines.launcher import Command
from pipelines.quickstart.arms import teacher_name
from pipelines.quickstart.environment import PINNED_KERNELS, kernel_env
from pipelines.stages import CHILD_ENV, OFFLINE_ENV, StageFailed, fingerprint, format_seconds
from atomic_files import atomic_write_text
from utils import CliError, REPO_ROOT

# Every command of the quickstart runs offline with these (and the quickstart itself, for its own loading), its
# CPU kernels pinned to the code paths every x86-64 CPU with AVX2 has (pipelines/quickstart/environment.py).
QUICKSTART_ENV = {**OFFLINE_ENV, **CHILD_ENV, **kernel_env()}
PROGRESS = re.compile(rb"(\d+)/(\d+) \[")  # a tqdm bar's `n/total [` in a command's output
MIN_DOCUMENTS = 20  # fewer cannot be split into train, validation and test parts worth evaluating on
SPLITS = ("train", "validation", "test")
SPLIT_SEED = "quickstart-split-v1"
STARTED = ".{}.started"  # beside a stage's folder, written first: the quickstart made it (removed with `.done`)
LOST_STATUS = 255  # multiprocessing's exit status for a forked process whose status was lost
TEACHER_SEED = 0  # teacher k (1-based) trains with seed TEACHER_SEED + k - 1
RANDOM_STUDENT_SEED = 0


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
    student_lr: float  # the learning rate without tuning (--no_tuning); one of `tune_lrs`
    eval_batch: int
    iia_pairs: int = 256
    gpu: bool = False
    max_documents: int | None = None  # the first paragraphs of the shipped corpus only
    seed_lr: float = 5e-4  # the learning rate of the seed's recipe (the quickstart's until issue 20)
    ablation_lr: float = 1e-4  # the ablation's rate (each term alone)
    teachers: int = 1  # teachers trained with different seeds; the main arms run with each
    seeds: int = 3  # student seeds per teacher (--seeds)
    ablation: bool = True  # run the ablation stage (first teacher only)
    # tuning on the validation part, the same number of tries each: the standard objective's learning rate, then
    # DIITO's causal_ce weight at the rate chosen
    tune_lrs: tuple[float, ...] = (2.5e-4, 5e-4, 1e-3)
    tune_weights: tuple[float, ...] = (0.1, 0.25, 0.5)
    curve_points: int = 5  # evaluations along each first-teacher run (snapshots), the last one its end
    # the ablation's arms, by name (those the family has); None: every one. The test preset runs the MLM/CLM term
    # alone (with and without smoothing for BERT) to exercise the stage in a few subprocesses.
    ablation_arms: tuple[str, ...] | None = None
    # downstream tasks (scripts/make_downstream_tasks.py): fine-tuning steps per model (0: none), their learning
    # rate, and the examples per task (train, and each of validation and test)
    downstream_steps: int = 150
    downstream_lr: float = 1e-3
    downstream_examples: tuple[int, int] = (2000, 500)
    downstream_seeds: int | None = None  # fine-tune with the first N student seeds only (None: all)
    downstream_tasks: tuple[str, ...] | None = None  # the tasks fine-tuned on (None: every one the corpus poses)
    low_resource: float | None = None  # the low-resource arms' share of the training data (None: no such arms)
    seed_recipe: bool = True  # the seed's recipe as a main arm (with every teacher), beside standard distillation


# Sizes measured on a 2-core CPU shared with other jobs (docs/quickstart.md): a 128-wide teacher gets
# well past the unigram plateau in the time a 256-wide one needs to reach it. `student_lr` is the
# rate without tuning; `seed_lr` the seed's recipe's.
PRESETS = {
    "small": Preset(vocab_size=2000, teacher_layers=4, hidden=128, heads=4, ffn=512, max_seq_length=128,
                    teacher_steps=1200, teacher_batch=32, teacher_lr=2e-3,
                    student_layers=2, student_steps=200, student_batch=32, student_lr=5e-4, eval_batch=64),
    # study: five teachers (seeds 0 to 4), the unit of its verdicts, two student seeds each, with DIITO's
    # controls and without the ablation or the seed's recipe (both left to `small`); the `small` teacher's shape
    # (the earlier study's were 6 blocks, 4000 steps) and 2 seeds, sized for about 100 min a family on 2 cores
    # (measured in docs/quickstart.md). Downstream, only `replaced`: `source` and `same_document` left every
    # model of `small` at chance (no room), and a task costs BERT about 15 min here (Llama 17 at 40 steps)
    "study": Preset(vocab_size=2000, teacher_layers=4, hidden=128, heads=4, ffn=512, max_seq_length=128,
                    teacher_steps=1500, teacher_batch=32, teacher_lr=2e-3,
                    student_layers=2, student_steps=200, student_batch=32, student_lr=5e-4, eval_batch=64,
                    teachers=5, seeds=2, ablation=False, downstream_steps=100, downstream_tasks=("replaced",),
                    low_resource=0.1, seed_recipe=False),
    "gpu": Preset(vocab_size=8000, teacher_layers=6, hidden=512, heads=8, ffn=2048, max_seq_length=128,
                  teacher_steps=6000, teacher_batch=128, teacher_lr=5e-4,
                  student_layers=3, student_steps=3000, student_batch=64, student_lr=5e-4, eval_batch=256,
                  iia_pairs=1024, gpu=True, downstream_steps=500, downstream_lr=2e-4,
                  downstream_examples=(4000, 1000)),
    "test": Preset(vocab_size=400, teacher_layers=2, hidden=32, heads=2, ffn=64, max_seq_length=64,
                   teacher_steps=20, teacher_batch=16, teacher_lr=2e-3,
                   student_layers=1, student_steps=6, student_batch=8, student_lr=5e-4, eval_batch=64,
                   iia_pairs=32, max_documents=400, downstream_steps=4, downstream_examples=(48, 24),
                   downstream_seeds=1, low_resource=0.1, ablation_arms=("abl_lm", "abl_lm_s0", "abl_jsd", "abl_on_policy"),
                   tune_lrs=(5e-4, 2e-3), tune_weights=(0.25, 0.5), curve_points=3),
}


# --- corpus ------------------------------------------------------------------------------------
def corpus_origin(manifest: dict, topics: bool) -> str:
    """The shipped corpus's sources in words, with the versions it was built from (its manifest)."""
    packages = [f"{name} {version}" for name, version in manifest["packages"].items()]
    return ("the standard library's docstrings" + (", the prose of pydoc's topic help" if topics else "")
            + (f" and the documentation (docstrings, prose files, README) of {', '.join(packages)}" if packages else "")
            + f", Python {manifest['python']}: shipped in data/quickstart_corpus.txt.xz (SHA-256 "
            + f"{manifest['sha256'][:12]}..., built by scripts/stdlib_corpus.py)")


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


def add_split_args(parser) -> None:
    """The flags of the split by document (the quickstart's and the downstream tasks', which must agree)."""
    parser.add_argument("--heldout_fraction", type=float, default=0.1,
                        help="Share of the paragraphs (whole documents) in the test part, on which every reported "
                             "figure is measured (default 0.1).")
    parser.add_argument("--validation_fraction", type=float, default=0.1,
                        help="Share of the paragraphs (whole documents) in the validation part, on which the tuning "
                             "and the ablation are read (default 0.1).")


def check_split_args(args) -> None:
    """CliError unless each fraction of `add_split_args` lies in (0, 0.3]."""
    for flag in ("heldout_fraction", "validation_fraction"):
        if not 0.0 < getattr(args, flag) <= 0.3:
            raise CliError(f"--{flag} must lie in (0, 0.3], got {getattr(args, flag)}")


def split_corpus(docs: list[str], fractions: tuple[float, float], source: str,
                 groups: list[str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """Deduplicate `docs` and split them into (train, validation, test), sharing no document.

    `fractions`: the validation and test parts' shares of the lines. `groups[i]` names the document
    line i belongs to (a module, a topic, a package file); without `groups` every line is a document
    of its own. Whole documents are held out, those with the smallest hashes of their names first:
    the test part until it has its share of the lines, then the validation part. So the split does
    not depend on the documents' order and moves little when a few come or go. Raises CliError when
    there are too few lines or documents to split.
    """
    if groups is None:
        groups = docs
    owner = dict(zip(reversed(docs), reversed(groups)))  # a repeated line belongs to its first document
    unique = list(dict.fromkeys(docs))
    n_groups = len({owner[d] for d in unique})
    if len(unique) < MIN_DOCUMENTS or n_groups < 3:
        raise CliError(
            f"{source}: {len(unique)} distinct document(s), too few to split into training, validation and test "
            f"parts; give at least {MIN_DOCUMENTS} (one per line, or paragraphs separated by blank lines)"
        )
    size: dict[str, int] = {}
    for d in unique:
        size[owner[d]] = size.get(owner[d], 0) + 1
    ranked = sorted(size, key=lambda g: hashlib.sha256(f"{SPLIT_SEED}\n{g}".encode()).hexdigest())
    part: dict[str, str] = {}
    i = 0
    for name, fraction in (("test", fractions[1]), ("validation", fractions[0])):
        target, n = max(1, round(len(unique) * fraction)), 0
        while n < target and i < len(ranked) - 1:  # at least one document stays for training
            part[ranked[i]] = name
            n += size[ranked[i]]
            i += 1
    out = {name: [d for d in unique if part.get(owner[d], "train") == name] for name in SPLITS}
    return out["train"], out["validation"], out["test"]


def read_shipped(max_documents: int | None) -> tuple[list[str], list[str], dict]:
    """(paragraphs, the document of each, manifest) of the shipped corpus (its first `max_documents` paragraphs),
    its SHA-256 checked; a missing or damaged copy is a CliError naming it."""
    try:
        lines, documents, manifest = shipped_corpus(max_documents)
    except CorpusError as err:
        raise CliError(str(err)) from None
    return lines, [name for name, n in documents for _ in range(n)], manifest


def shipped_sha256() -> str:
    """The SHA-256 the shipped corpus's manifest records (the corpus stage's key: checked when it is read)."""
    from doc_corpus import SHIPPED

    try:
        return json.loads(SHIPPED.with_name("quickstart_corpus.json").read_text(encoding="utf-8"))["sha256"]
    except (OSError, ValueError, KeyError) as err:
        raise CliError(f"the shipped corpus's manifest beside {SHIPPED} cannot be read ({err}): restore data/ "
                       f"from git") from None


# --- tokenizer ---------------------------------------------------------------------------------
def load_fast_tokenizer(name: str):
    """The --tokenizer (local folder or cached hub name); CliError unless it loads offline as a fast tokenizer."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, use_fast=True)
    except Exception as err:  # noqa: BLE001 -- transformers raises many types; all mean "cannot load"
        raise CliError(f"--tokenizer {name}: cannot load it offline ({type(err).__name__}: {err})") from None
    if not getattr(tok, "is_fast", False):
        raise CliError(f"--tokenizer {name}: no fast (Rust) implementation, which scripts/binarized_data.py needs")
    return tok


# --- stage bookkeeping -------------------------------------------------------------------------
def started(folder: Path) -> Path:
    """The marker beside a stage's folder that says the quickstart made it and its stage has not finished."""
    return folder.with_name(STARTED.format(folder.name))


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def read_marker(folder: Path) -> dict | None:
    """The `.done` record of `folder`, or None if it has none (or an unreadable one)."""
    try:
        return json.loads((folder / ".done").read_text())
    except (OSError, ValueError):
        return None


class Pipeline:
    """Runs stages and commands, skipping what a matching `.done` marker says is finished."""

    def __init__(self, out: Path, force: bool, env: dict[str, str], jobs: int = 1, preload: bool = True,
                 inputs: tuple[Path, ...] = (), salt: dict | None = None):
        self.out = out
        self.salt = salt or {}  # joins every stage's key (outputs made otherwise are not "done")
        self.inputs = [Path(p).resolve() for p in inputs]  # the user's files: never inside what `clear` removes
        self.preload = preload  # fork commands from a server that imported torch once (pipelines/launcher.py)
        self.force = force
        self.env = env
        self.jobs = jobs  # commands run at once (`parallel`); with more than one, no progress bars
        # every command takes one of `jobs` slots, whichever thread runs it: tasks started with `started` and
        # the caller's own `parallel` share the cores, never oversubscribe them
        self._slots = threading.BoundedSemaphore(max(1, jobs))
        self._waits = threading.local()
        self._lock = threading.Lock()
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands = out / "commands.sh"
        self.skipped: list[str] = []
        self.ran: list[str] = []
        self._running: set = set()  # the commands running now (`stop_running`)

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
        key = fingerprint({**settings, **self.salt} if self.salt else settings)
        marker = self.complete(folder, key, outputs)
        if marker is not None:
            print(f"  {name}: done already ({format_seconds(marker['seconds'])} on {marker['finished']}); skipping",
                  flush=True)
            self.skipped.append(name)
            return marker
        self.clear(folder)
        folder.mkdir(parents=True, exist_ok=True)
        # beside the folder, not in it: a stage's command may want an empty folder (causal_train.py --force)
        atomic_write_text(started(folder), name + "\n")  # the folder is ours from now on (`clear`)
        start, waited = time.time(), self.waited()
        result = work(folder) or {}
        seconds = time.time() - start - (self.waited() - waited)  # not the time its commands queued for a core
        marker = {"name": name, "key": key, "settings": settings, "seconds": round(seconds, 2),
                  "finished": dt.datetime.now().isoformat(timespec="seconds"), **result,
                  "files": sorted(p.name for p in folder.iterdir() if p.name != ".done")}
        atomic_write_text(folder / ".done", json.dumps(marker, indent=2, default=str))
        started(folder).unlink()
        self.ran.append(name)
        return marker

    def clear(self, folder: Path) -> None:
        """Empty a stage's folder before the stage runs, so that no output of an older run survives into the new
        one; but only a folder the pipeline made itself (`started` or `.done` says so) and only what its stage
        wrote there (the files `.done` lists). Anything else, or an input, is the user's: CliError naming it."""
        if not folder.exists():
            return
        for inp in self.inputs:
            if inp == folder or folder in inp.parents:
                raise CliError(f"{inp} is an input of this quickstart and lies in {folder}, which the stage about to "
                               f"run replaces: move it out of --out {self.out}")
        entries = sorted(p.name for p in folder.iterdir())
        if not entries:
            return
        marker = read_marker(folder)
        if marker is None and not started(folder).exists():
            raise CliError(f"{folder} was not made by the quickstart (it holds {_some(entries)}); the stage about to "
                           f"run would replace it: move it out of --out {self.out} or give another --out")
        if marker is not None and "files" in marker:
            foreign = [e for e in entries if e not in marker["files"] and e != ".done"]
            if foreign:
                raise CliError(f"{folder} holds {_some(foreign)}, which its stage did not write; the stage about to "
                               f"run replaces the folder: move them out of --out {self.out} first")
        shutil.rmtree(folder)

    def command(self, log_name: str, script: str, args: list[str], fresh: bool = False) -> float:
        """Run `python <script> <args>` from the repository root, its whole output to `logs/<log_name>.log`.

        The terminal shows one progress bar for it, fed by the progress counts (`n/total`) the
        command prints. Returns the wall time in seconds; raises StageFailed on a non-zero exit.
        `fresh`: a new `python` even when commands are forked from the preloaded server (for a script whose
        output depends on what the interpreter imported before it).
        """
        from tqdm import tqdm

        shown = shlex.join(["python", script, *map(str, args)])
        with self._lock, open(self.commands, "a", encoding="utf-8") as fh:
            fh.write(shown + "\n")
        log_path = self.logs / f"{log_name}.log"
        bar = tqdm(total=None, desc=f"  {log_name}", leave=False, dynamic_ncols=True, file=sys.stderr,
                   disable=None if self.jobs == 1 else True,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}]")
        with open(log_path, "wb") as log:
            log.write(f"$ {shown}\n".encode())
            try:
                with self.slot():
                    start = time.time()
                    rc, forked = self._run_once(script, args, fresh, log, bar)
                    if rc == LOST_STATUS and forked:
                        # the forkserver lost the command's exit status (multiprocessing reports 255 when its status
                        # pipe closes unread; no script of ours exits 255): run it again as a fresh python, once
                        log.write(b"\n[quickstart] the preloaded server lost this command's exit status; running "
                                  b"it again as a fresh python\n")
                        rc, _ = self._run_once(script, args, True, log, bar)
                    seconds = time.time() - start
            finally:
                bar.close()
        if rc != 0:
            tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            raise StageFailed(f"{script} exited with status {rc}; its output is in {log_path}, ending with:\n"
                              + "\n".join("    " + line[-300:] for line in tail) + f"\nThe command was:\n  {shown}")
        return seconds

    @contextmanager
    def slot(self):
        """Hold one of the `jobs` command slots; the time spent waiting for it is this thread's (`waited`), so
        that a unit's seconds count its commands' running time, not the queue."""
        start = time.time()
        with self._slots:
            self._waits.seconds = self.waited() + time.time() - start
            yield

    def waited(self) -> float:
        """Seconds this thread has waited for command slots so far."""
        return getattr(self._waits, "seconds", 0.0)

    def _run_once(self, script: str, args: list[str], fresh: bool, log, bar) -> tuple[int, bool]:
        """Run the command once, its output into `log` and its progress into `bar`: (exit status, forked)."""
        proc = Command(script, [*map(str, args)], self.env, str(REPO_ROOT), self.preload and not fresh)
        with self._lock:
            self._running.add(proc)
        try:
            while chunk := os.read(proc.fileno(), 65536):
                log.write(chunk)
                log.flush()  # `tail -f` on the log shows the command's output as it comes
                found = PROGRESS.findall(chunk)
                if found:
                    done, total = (int(x) for x in found[-1])
                    if bar.total != total:
                        bar.reset(total=total)
                    bar.n = min(done, total)
                    bar.refresh()
            return proc.wait(), proc.forked
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
        finally:
            with self._lock:
                self._running.discard(proc)

    def parallel(self, tasks: list) -> list:
        """Run the zero-argument callables `tasks` (each its own units and commands), `jobs` at a time; their
        results in order. Every command is its own seeded process, so the numbers do not depend on `jobs`."""
        with self.started(tasks) as futures:
            return [f.result() for f in futures]

    @contextmanager
    def started(self, tasks: list):
        """Start `tasks` as `parallel` runs them and yield their futures while the caller goes on: a slot the tasks
        leave idle (five teachers on two cores) runs the caller's commands. With one job (or one task) the tasks run
        first, in order, and the futures are done. If the caller or a task fails, every command still running stops."""
        if self.jobs == 1 or len(tasks) < 2:
            futures = []
            for task in tasks:
                futures.append(Future())
                futures[-1].set_result(task())
            yield futures
            return
        first_failure: list[BaseException] = []

        def failed(future: Future) -> None:  # a failed task stops the other commands at once, the caller's too
            if not future.cancelled() and future.exception() is not None:
                with self._lock:
                    first_failure.append(future.exception())
                self.stop_running()

        pool = ThreadPoolExecutor(max_workers=self.jobs)
        try:
            futures = [pool.submit(task) for task in tasks]
            for future in futures:
                future.add_done_callback(failed)
            yield futures
        except BaseException as stopped:
            # Ctrl-C, SIGTERM or a failed task: the commands of the other threads stop too, rather than run on
            # (for hours, at the study preset) while the pool waits for them
            with self._lock:
                cause = first_failure[0] if first_failure else None
            self.stop_running()
            if cause is not None and cause is not stopped and not isinstance(stopped, KeyboardInterrupt):
                raise cause from None  # what failed first, not a command it stopped
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def stop_running(self) -> None:
        """Terminate every command running now (each thread's `command` then raises StageFailed)."""
        with self._lock:
            running = list(self._running)
        for proc in running:
            proc.terminate()


# --- the stages both families share --------------------------------------------------------------
class Quickstart:
    """Runs the stages of one family's quickstart; a subclass fills in what differs (see the hooks below)."""

    n_stages = 0  # stages the terminal announces
    family = ""  # --model_type / --tokenizer_type of the teacher's family
    eval_script = ""  # run_mlm.py or run_clm.py
    student_type = ""  # causal_train.py --student_type
    extract_script = ""  # scripts/extract_distilbert.py or scripts/extract.py

    def __init__(self, args, preset: Preset, user_docs: list[str] | None):
        self.args = args
        self.preset = preset
        self.user_docs = user_docs
        self.out = Path(args.out).resolve()
        self.seeds = list(range(1, (args.seeds or preset.seeds) + 1))
        env = dict(os.environ, **QUICKSTART_ENV)
        native = getattr(args, "cpu_kernels", "pinned") == "native"
        if native:  # the CPU's own code paths: another CPU kind gives other numbers
            for name in PINNED_KERNELS:
                env.pop(name, None)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        inputs = [*(args.text or ()), *([args.tokenizer] if args.tokenizer and Path(args.tokenizer).exists() else [])]
        self.pipe = Pipeline(self.out, args.force, env, getattr(args, "jobs", 1),
                             preload=not getattr(args, "no_preload", False), inputs=inputs,
                             salt={"cpu_kernels": "native"} if native else {})
        self.device_args = ["--n_gpu", "1", "--bf16"] if preset.gpu else ["--n_gpu", "0"]
        self.trainer_device_args = ["--bf16"] if preset.gpu else ["--use_cpu", "--no_dataloader_pin_memory"]

    # --- hooks: what each family fills in ------------------------------------------------------------
    def family_settings(self) -> dict:
        """Settings that key the data and student stages' markers besides their inputs."""
        return {}

    def tokenizer_title(self) -> str:
        raise NotImplementedError

    def make_tokenizer(self, folder: Path) -> int:
        """Copy --tokenizer or train one on the train part into `folder`; return its size."""
        raise NotImplementedError

    def teacher_command(self, steps: int, seed: int) -> tuple[str, str, list]:
        """(banner title, script, arguments) of the teacher's training with `seed`."""
        raise NotImplementedError

    def after_binarize(self, folder: Path, data_file: Path) -> None:
        """What the data stage does after binarizing (the BERT family counts tokens)."""

    def student_config_text(self, record: dict) -> str:
        """The student config (JSON text) from the extraction's record."""
        raise NotImplementedError

    def eval_options(self, split: str = "test") -> tuple[str, list]:
        """(banner detail, options) of the evaluation on the `split` part common to every model."""
        raise NotImplementedError

    def run_stages(self) -> tuple[dict, dict]:
        """Run the stages in order; return (the report stage's record, the stage records)."""
        raise NotImplementedError

    def banner(self, k: int, title: str) -> None:
        print(f"\n[stage {k}/{self.n_stages}] {title}", flush=True)

    # 1
    def corpus(self) -> dict:
        """Stage 1: the documents (the shipped documentation prose or --text), deduplicated and split by document into
        train, validation (tuning and the ablation) and test (every reported figure) parts."""
        p, args = self.preset, self.args
        self.banner(1, "corpus: real English prose, split by document into train, validation and test parts")
        if self.user_docs is not None:
            source = {"text": [str(Path(t).resolve()) for t in args.text],
                      "sha256": hashlib.sha256("\n".join(self.user_docs).encode()).hexdigest()}
        else:
            source = {"shipped": shipped_sha256(), "max_documents": p.max_documents}
        fractions = (args.validation_fraction, args.heldout_fraction)
        settings = {"source": source, "fractions": fractions, "split": SPLIT_SEED}

        def work(folder: Path) -> dict:
            record = {}
            if self.user_docs is not None:
                docs, groups, origin = self.user_docs, None, "your --text files: " + ", ".join(args.text)
            else:
                docs, groups, manifest = read_shipped(p.max_documents)
                record["versions"] = {"python": manifest["python"], **manifest["packages"]}
                record["corpus_sha256"] = manifest["sha256"]
                origin = corpus_origin(manifest, manifest.get("pydoc_topics", False))
            parts = dict(zip(SPLITS, split_corpus(docs, fractions, "the corpus", groups)))
            stats = {"origin": origin}
            for name, part in parts.items():
                atomic_write_text(folder / f"{name}.txt", "\n".join(part) + "\n")
                stats[f"{name}_documents"] = len(part)
                stats[f"{name}_words"] = sum(len(d.split()) for d in part)
            print("  " + ", ".join(f"{name} {stats[name + '_documents']} paragraphs ({stats[name + '_words']} words)"
                                   for name in SPLITS), flush=True)
            return {**stats, **record}

        return self.pipe.unit("corpus", self.out / "corpus", settings, work, tuple(f"{n}.txt" for n in SPLITS))

    # 2
    def tokenizer(self, corpus: dict) -> dict:
        """Stage 2: the family's tokenizer, trained on the train part or copied from --tokenizer."""
        self.banner(2, "tokenizer: " + (f"--tokenizer {self.args.tokenizer}" if self.args.tokenizer
                                         else self.tokenizer_title()))
        settings = {"corpus": corpus["key"], "vocab_size": self.preset.vocab_size, "tokenizer": self.args.tokenizer,
                    **self.tokenizer_settings()}

        def work(folder: Path) -> dict:
            os.environ.update(QUICKSTART_ENV)
            size = self.make_tokenizer(folder)
            print(f"  {size} entries, saved to {folder}", flush=True)
            return {"vocab_size": size}

        return self.pipe.unit("tokenizer", self.out / "tokenizer", settings, work, ("tokenizer.json",))

    def tokenizer_settings(self) -> dict:
        return {}

    # 3
    def teacher(self, corpus: dict, tokenizer: dict, k: int = 1) -> dict:
        """Stage 3: teacher k trained from scratch (the family's `teacher_command`), with seed TEACHER_SEED + k - 1."""
        steps = self.args.teacher_steps or self.preset.teacher_steps
        title, script, argv = self.teacher_command(steps, TEACHER_SEED + k - 1)
        if self.preset.teachers > 1:
            title += f"; teacher {k} of {self.preset.teachers} (seed {TEACHER_SEED + k - 1})"
        self.banner(3, title)
        settings = {"corpus": corpus["key"], "tokenizer": tokenizer["key"], "argv": [str(a) for a in argv]}

        def work(folder: Path) -> dict:
            seconds = self.pipe.command(teacher_name(k), script,
                                        [*argv, "--output_dir", folder, "--overwrite_output_dir"])
            return {"train_seconds": round(seconds, 2), "steps": steps, "seed": TEACHER_SEED + k - 1}

        return self.pipe.unit(teacher_name(k), self.out / teacher_name(k), settings, work,
                              ("model.safetensors", "config.json"))

    # 4
    def data(self, corpus: dict, tokenizer: dict, title: str, outputs: tuple[str, ...] = ()) -> dict:
        """Stage 4: the train part binarized with the tokenizer (then the family's `after_binarize`)."""
        self.banner(4, title)
        settings = {"corpus": corpus["key"], "tokenizer": tokenizer["key"], **self.family_settings()}

        def work(folder: Path) -> dict:
            self.pipe.command("binarize", "scripts/binarized_data.py", [
                "--file_path", self.out / "corpus" / "train.txt", "--tokenizer_type", self.family,
                "--tokenizer_name", self.out / "tokenizer", "--dump_file", folder / "binarized_text", "--seed", 0])
            found = sorted(folder.glob("binarized_text.*.bin"))
            if len(found) != 1:
                raise StageFailed(f"scripts/binarized_data.py left {len(found)} .bin files in {folder}, expected one")
            self.after_binarize(folder, found[0])
            return {"data_file": found[0].name}

        return self.pipe.unit("data", self.out / "data", settings, work, outputs)

    # 6
    def student(self, name: str, argv: list, settings: dict, record: dict, done_line=None) -> dict:
        """One causal_train.py run into students/<name> (its checkpoints removed: the final student is what
        the report needs). `done_line(seconds)`, if given, is printed when it finishes."""

        def work(folder: Path) -> dict:
            seconds = self.pipe.command(f"student_{name}", "causal_train.py", ["--dump_path", folder, "--force", *argv])
            for checkpoint in folder.glob("checkpoint-*"):
                shutil.rmtree(checkpoint, ignore_errors=True)
            if done_line is not None:
                print(done_line(seconds), flush=True)
            return {"train_seconds": round(seconds, 2), **record}

        return self.pipe.unit(name, self.out / "students" / name, settings, work, ("model.safetensors", "config.json"))

    # held-out evaluation (every model, same options)
    def evaluate_one(self, name: str, model_dir: Path, model_record: dict, split: str = "test") -> dict:
        """Perplexity of one model on the `split` part (`eval/<name>`; `eval_validation/<name>` for the validation
        part), with the options every model gets."""
        _, common = self.eval_options(split)
        argv = ["--model_name_or_path", model_dir, *common]
        settings = {"model": model_record["key"], "argv": [str(a) for a in argv]}

        def work(folder: Path) -> dict:
            self.pipe.command(f"eval_{name}" if split == "test" else f"eval_{split}_{name}", self.eval_script,
                              [*argv, "--output_dir", folder])
            metrics = json.loads((folder / "eval_results.json").read_text())
            print(f"  {name}: {split} perplexity {metrics['perplexity']:.2f}", flush=True)
            return {"perplexity": metrics["perplexity"], "eval_loss": metrics["eval_loss"],
                    "eval_samples": metrics.get("eval_samples"), "split": split}

        folder = self.out / ("eval" if split == "test" else f"eval_{split}") / name
        return self.pipe.unit(f"eval {name}" + ("" if split == "test" else f" ({split})"), folder, settings, work,
                              ("eval_results.json",))

    def report_settings(self, version, **groups: dict) -> dict:
        """The report stage's key: when each input was made too, so that anything redone upstream is reported afresh."""
        settings = {group: {k: (v["key"], v["finished"]) for k, v in records.items()}
                    for group, records in groups.items()}
        settings["version"] = version
        return settings

    def run(self) -> dict:
        """Run every stage (those found done are skipped); returns the wall time and what ran or was skipped."""
        start = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.pipe.commands, "a", encoding="utf-8") as fh:
            fh.write(f"# quickstart {dt.datetime.now().isoformat(timespec='seconds')}: "
                     f"{shlex.join(['python', 'scripts/quickstart.py', *sys.argv[1:]])}\n"
                     f"cd {shlex.quote(str(REPO_ROOT))}\n"
                     + "".join(f"export {k}={v}\n" for k, v in QUICKSTART_ENV.items())
                     + f"export OMP_NUM_THREADS={self.args.threads} MKL_NUM_THREADS={self.args.threads}\n")
        report = self.run_stages()
        elapsed = time.time() - start
        print(f"\nquickstart finished in {format_seconds(elapsed)} "
              f"(ran {len(self.pipe.ran)}, skipped {len(self.pipe.skipped)} found done already)")
        print((self.out / "report_table.md").read_text(encoding="utf-8"))
        print(report["verdict"])
        print(f"report: {self.out / 'report.md'}; full output of every command: {self.out / 'logs'}")
        return {"seconds": elapsed, "ran": self.pipe.ran, "skipped": self.pipe.skipped}
