#!/usr/bin/env python
"""The paper's tables in one command: distil, fine-tune, evaluate and tabulate the rows of
training_configs/paper/ through the project's own scripts, as a user would run them by hand.

    python scripts/reproduce.py --list                                   # the rows, with the paper's numbers
    python scripts/reproduce.py --rows distilbert-6L-0.1B,diito-6L-0.1B --seeds 3 --out repro --dry_run
    python scripts/reproduce.py --rows distilbert-6L-0.1B,diito-6L-0.1B --seeds 3 --out repro
    python scripts/reproduce.py --preset tiny --rows distilbert-6L-0.1B,diito-6L-0.1B --seeds 2 --out /tmp/tiny

The chain, every stage a command of this project (all saved in OUT/commands.sh, each one's output
in OUT/logs/):

  shared      once for all rows: scripts/binarized_data.py and scripts/token_counts.py per data
              recipe, scripts/extract_distilbert.py per student depth, scripts/make_mapping.py for
              mappings given by alignment name, the held-out data of run_iia.py
  distil      per row and seed: causal_train.py (torchrun over every visible GPU, or one process),
              the effective batch of the config kept whatever the number of GPUs
  finetune    per row, seed and task: run_glue.py (9 GLUE tasks), run_ner.py (CoNLL-2003),
              run_qa.py (SQuAD v1.1), run_mlm.py (WikiText-103 perplexity), run_iia.py (IIA), each
              with its own seed; --jobs N runs N at once (one GPU each)
  tables      OUT/paper_tables.md (and .json, plots/): the paper's tables, mean +- std over seeds
              with the per-seed values, the paper's numbers beside them, the compute used

Every stage is resumable: a stage records what it ran with in OUT/state/ once it has finished, and
a re-run skips every stage whose record matches; an interrupted distillation continues from its
last checkpoint (causal_train.py --resume), an interrupted fine-tuning from the Trainer's. Ctrl-C
or SIGTERM stops the running commands cleanly; run the same command again to continue.

--preset tiny swaps in local stand-ins (scripts/reproduce_tiny.py: a tokenizer, text, GLUE, CoNLL
and SQuAD files; a teacher trained from a config with run_mlm.py) and runs every stage for a few
steps: the whole chain on a CPU in minutes, offline. Its numbers mean nothing.

Cost: --dry_run prints every command and an estimate of the GPU-hours, from the token budget of
each row and a measured training speed (--bench_json, or the H200 figures of docs/gpu.md).
README.md, section "Reproducing the paper", and docs/reproduce.md say more.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_configs import (  # noqa: E402
    ALL_TASKS, CONFIG_DIR, GLUE_COLUMNS, GLUE_TASKS, TINY, TRAINED_TASKS, Row, available_rows, fingerprint, load_rows,
    parse_tasks, tiny_row,
)
from reproduce_tables import format_hours, write_tables  # noqa: E402
from utils import REPO_ROOT, CliError, atomic_write_text, run_cli  # noqa: E402

logger = logging.getLogger("causal_distill.reproduce")

MANIFEST = "reproduce.json"
MANIFEST_TOOL = "causal-distill scripts/reproduce.py"
CHILD_ENV = {"TOKENIZERS_PARALLELISM": "false", "WANDB_DISABLED": "true", "PYTHONUNBUFFERED": "1"}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Flags that change where things are cached or how progress is shown, not what is computed:
# left out of a stage's fingerprint, so that changing them does not redo finished work.
VOLATILE_FLAGS = {"--cache_dir"}
# Measured training speed used when no --bench_json is given: docs/gpu.md, one H200, bf16,
# bench/bench_train_step.py --preset base (BERT-base teacher, 6-block student), batch 40 of
# WikiText-like lengths (mean 62 tokens), the paper's setting; real (non-padding) tokens per second.
DEFAULT_SPEED = {"kd": 21836.0, "diito_shared": 16915.0}
DEFAULT_SPEED_SOURCE = ("docs/gpu.md: one NVIDIA H200, bf16, bench_train_step.py --preset base, batch 40 of "
                        "WikiText-like lengths (standard 21,836 and DIITO 16,915 real tokens/s)")
PROGRESS_TQDM = re.compile(r"(\d+)/(\d+) \[")
STEP_LINE = re.compile(r"step (\d+) \| .*?\| ([\d.]+) tok/s")
TOTAL_LINE = re.compile(r"training for (\d+) optimiser steps")


# --- what a stage is ---------------------------------------------------------------------------
@dataclass
class Command:
    """One command line of the chain: `python <script> <args>` (or torchrun) run from the repository root."""

    script: str
    args: list
    log: str
    launcher: tuple = ()

    def argv(self, extra: tuple = ()) -> list[str]:
        # torchrun is found beside this interpreter (its venv) before PATH
        beside = Path(sys.executable).with_name("torchrun")
        head = [str(beside) if beside.exists() else shutil.which("torchrun") or "torchrun", *self.launcher[1:]] \
            if self.launcher else [sys.executable]
        return [*head, self.script, *map(str, self.args), *extra]

    def shown(self, extra: tuple = ()) -> str:
        head = [shlex.quote(a) for a in (self.launcher or ["python"])]
        return " ".join([*head, self.script, *(shlex.quote(str(a)) for a in [*self.args, *extra])])


@dataclass
class Stage:
    """A resumable unit: its commands (or in-process `work`), the outputs that prove it finished,
    the stages it depends on, and what the tables need to know about it (`info`)."""

    id: str
    title: str
    phase: str  # shared | distil | finetune
    folder: Path
    outputs: tuple
    commands: list = field(default_factory=list)
    deps: tuple = ()
    kind: str = "plain"  # plain | distil (resumes with --resume) | finetune (Trainer output folder)
    work: object = None  # in-process work(folder) -> dict, for what no script does
    info: dict = field(default_factory=dict)

    def marker_name(self) -> str:
        return self.id.replace("/", "__")


class Interrupted(Exception):
    """A stop signal arrived; the running commands were stopped cleanly."""


class StageFailed(Exception):
    """A command of the chain exited with an error."""


# --- devices -----------------------------------------------------------------------------------
def detect_gpus() -> int:
    """CUDA devices torch sees (CUDA_VISIBLE_DEVICES applies)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_description(gpus: int) -> str:
    """The device the runs use, in words (GPU name, or the CPU model)."""
    if gpus > 0:
        import torch

        return f"{gpus} x {torch.cuda.get_device_name(0)}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU ({model}, {os.cpu_count()} cores)"


def split_batch(effective: int, batch_size: int, processes: int, source: str) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) giving `effective` sequences per optimiser step.

    The micro-batch is the largest divisor of the per-process share not above the config's
    batch_size, so the effective batch is exact. CliError when it does not divide over the processes.
    """
    if effective % processes:
        raise CliError(f"{source}: the effective batch {effective} does not divide over {processes} processes; "
                       f"pass --gpus N with N dividing {effective}")
    share = effective // processes
    micro = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return micro, share // micro


# --- the plan ----------------------------------------------------------------------------------
def flag_args(options: dict) -> list:
    """`{"a": 1, "b": True, "c": False}` as `["--a", 1, "--b"]` (False and None leave the flag out)."""
    out = []
    for key, value in options.items():
        if value is True:
            out.append(f"--{key}")
        elif value is False or value is None:
            continue
        else:
            out += [f"--{key}", value]
    return out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "x"


class Plan:
    """Every stage of a reproduction, in the order they run."""

    def __init__(self, args, rows: list[Row], tasks: list[str], out: Path, gpus: int):
        self.args = args
        self.tasks = tasks
        self.out = out
        self.gpus = gpus
        self.processes = max(1, gpus)
        self.bf16 = args.precision == "bf16" or (args.precision == "auto" and gpus > 0)
        self.seeds = list(range(1, args.seeds + 1))
        self.finetune_seeds = args.finetune_seeds
        self.stages: dict[str, Stage] = {}
        self.tiny = args.preset == "tiny"
        shared = out / "shared"
        self.standins = shared / "standins"
        self.tiny_teacher = shared / "teacher"
        if self.tiny:
            self._tiny_stages()
            rows = [tiny_row(r, self.standins, self.tiny_teacher) for r in rows]
        self.rows = rows
        for row in rows:
            self._row_stages(row)

    def add(self, stage: Stage) -> Stage:
        return self.stages.setdefault(stage.id, stage)

    def common_deps(self) -> tuple:
        return ("shared/teacher",) if self.tiny else ()

    # shared stages ----------------------------------------------------------------------------
    def _tiny_stages(self) -> None:
        self.add(Stage("shared/standins", "tiny stand-ins (tokenizer, text, GLUE/CoNLL/SQuAD files, teacher config)",
                       "shared", self.standins, ("standins.json",),
                       [Command("scripts/reproduce_tiny.py", ["--out", self.standins, "--seed", 0], "shared.standins")]))
        steps = TINY["teacher_steps"]
        self.add(Stage("shared/teacher", f"tiny teacher: BERT from standins/teacher_config.json, {steps} steps "
                                         f"(run_mlm.py --do_train)", "shared", self.tiny_teacher,
                       ("model.safetensors", "config.json"),
                       [Command("run_mlm.py", [
                           "--config_name", self.standins / "teacher_config.json",
                           "--tokenizer_name", self.standins / "tokenizer",
                           "--train_file", self.standins / "text" / "train.txt", "--line_by_line",
                           "--max_seq_length", TINY["max_seq_length"], "--do_train", "--max_steps", steps,
                           "--per_device_train_batch_size", 16, "--learning_rate", 3e-3, "--warmup_steps", 5,
                           "--save_strategy", "no", "--report_to", "none", "--seed", 0,
                           "--dataloader_num_workers", 0, *self.trainer_device_args(),
                           "--output_dir", self.tiny_teacher, "--overwrite_output_dir"], "shared.teacher")],
                       deps=("shared/standins",)))

    def cache_args(self) -> list:
        return ["--cache_dir", self.args.cache_dir] if self.args.cache_dir else []

    def trainer_device_args(self) -> list:
        if self.gpus == 0:
            return ["--use_cpu"]
        return ["--bf16"] if self.bf16 else []

    def data_stage(self, row: Row) -> tuple[Stage, Path, Path]:
        cfg = row.config
        data, tokenizer = cfg["data"], cfg["teacher"]["tokenizer"]
        folder = self.out / "shared" / "data" / slug(f"{data['name']}.{Path(tokenizer).name}")
        source = ["--file_path", data["file_path"]] if data.get("file_path") else \
            ["--dataset_name", "+".join(data["datasets"]), "--fast_process", *self.cache_args()]
        bin_file = folder / f"binarized_text.{data['split']}.{Path(tokenizer).name}.bin"
        counts = folder / "token_counts.pickle"
        stage = self.add(Stage(
            f"shared/data/{folder.name}", f"data: binarize {data.get('file_path') or '+'.join(data['datasets'])} "
                                          f"and count its tokens", "shared", folder, (bin_file.name, counts.name),
            [Command("scripts/binarized_data.py", [*source, "--split", data["split"], "--field_name", data["field_name"],
                                                   "--tokenizer_type", cfg["teacher"]["type"], "--tokenizer_name",
                                                   tokenizer, "--dump_file", folder / "binarized_text"],
                     f"shared.data.{folder.name}.binarize"),
             Command("scripts/token_counts.py", ["--data_file", bin_file, "--token_counts_dump", counts],
                     f"shared.data.{folder.name}.token_counts")],
            deps=("shared/standins",) if self.tiny else ()))
        return stage, bin_file, counts

    def init_stage(self, row: Row) -> Stage:
        cfg = row.config
        student = cfg["student"]
        blocks = student["teacher_blocks"]
        name = slug(f"{Path(cfg['teacher']['name']).name}-{len(blocks)}L-" + "".join(f"{b}." for b in blocks).rstrip("."))
        folder = self.out / "shared" / "init" / name
        return self.add(Stage(
            f"shared/init/{name}", f"student initialisation: teacher blocks {','.join(map(str, blocks))} "
                                   f"(scripts/extract_distilbert.py)", "shared", folder,
            ("config.json", "model.safetensors"),
            [Command("scripts/extract_distilbert.py", [
                "--model_type", cfg["teacher"]["type"], "--model_name", cfg["teacher"]["name"],
                "--dump_checkpoint", folder, "--num_layers", len(blocks), "--layers", ",".join(map(str, blocks)),
                *(["--vocab_transform"] if student["vocab_transform"] else [])], f"shared.init.{name}")],
            deps=self.common_deps()))

    def mapping(self, row: Row, spec: dict, init: Stage) -> tuple[Path, tuple]:
        """The .nm file of `spec` for `row`'s student, and the stage(s) that make it."""
        cfg = row.config
        if "file" in spec and not self.tiny:
            return REPO_ROOT / spec["file"], ()
        if "file" in spec:  # tiny: the shipped file, its dimension slices scaled to the stand-in teacher's heads
            source = REPO_ROOT / spec["file"]
            target = self.out / "shared" / "mappings" / f"{Path(spec['file']).stem}.tiny.nm"
            stage = self.add(Stage(
                f"shared/mappings/{target.name}", f"neuron mapping: {spec['file']} scaled to the tiny teacher's heads",
                "shared", target.parent, (target.name,), deps=("shared/teacher",),
                work=lambda folder, source=source, target=target: rescale_mapping(
                    source, target, self.tiny_teacher / "config.json"),
                info={"work": f"rescale {spec['file']} -> {target}"}))
            return target, (stage.id,)
        target = self.out / "shared" / "mappings" / f"{init.folder.name}.{spec['alignment']}.nm"
        stage = self.add(Stage(
            f"shared/mappings/{target.name}", f"neuron mapping: {spec['alignment']} for {init.folder.name} "
                                              f"(scripts/make_mapping.py)", "shared", target.parent,
            (target.name,), [Command("scripts/make_mapping.py", ["--teacher", cfg["teacher"]["name"], "--student", init.folder,
                                                     "--alignment", spec["alignment"], "--output", target],
                         f"shared.mappings.{target.name}")],
            deps=(init.id,)))
        return target, (stage.id,)

    def iia_data(self, row: Row) -> tuple[Path, tuple]:
        cfg = row.config
        hub = cfg["finetune"]["iia"]["hub_data"]
        if "file" in hub:
            return Path(hub["file"]), ()
        tokenizer = cfg["teacher"]["tokenizer"]
        split = hub.get("split", "validation")
        folder = self.out / "shared" / "eval_data" / slug(f"{hub['dataset_name']}.{split}.{Path(tokenizer).name}")
        data_file = folder / f"binarized_text.{split}.{Path(tokenizer).name}.bin"
        stage = self.add(Stage(
            f"shared/eval_data/{folder.name}", f"held-out data for run_iia.py: {hub['dataset_name']} {split}",
            "shared", folder, (data_file.name,),
            [Command("scripts/binarized_data.py", [
                "--dataset_name", hub["dataset_name"], "--split", split, "--field_name", hub.get("field_name", "text"),
                "--tokenizer_type", cfg["teacher"]["type"], "--tokenizer_name", tokenizer,
                "--dump_file", folder / "binarized_text", *self.cache_args()], f"shared.eval_data.{folder.name}")],
            deps=self.common_deps()))
        return data_file, (stage.id,)

    # per row -----------------------------------------------------------------------------------
    def _row_stages(self, row: Row) -> None:
        cfg = row.config
        data_stage, bin_file, counts = self.data_stage(row)
        init = self.init_stage(row)
        deps = (data_stage.id, init.id)
        mapping_args = []
        if cfg["neuron_mapping"]:
            nm, nm_deps = self.mapping(row, cfg["neuron_mapping"], init)
            deps += nm_deps
            mapping_args = ["--neuron_mapping", nm]
        distil = dict(cfg["distillation"])
        micro, accum = split_batch(distil.pop("effective_batch"), distil.pop("batch_size"), self.processes,
                                   f"{row.path}: distillation")
        launcher = ()
        if self.processes > 1:
            launcher = ("torchrun", "--standalone", "--nproc_per_node", str(self.processes))
        for seed in self.seeds:
            student = self.out / "students" / row.name / f"seed{seed}"
            args = [
                "--dump_path", student, "--data_file", bin_file, "--token_counts", counts,
                "--student_type", cfg["student"]["type"], "--student_config", init.folder,
                "--student_pretrained_weights", init.folder, "--teacher_type", cfg["teacher"]["type"],
                "--teacher_name", cfg["teacher"]["name"], "--tokenizer_name", cfg["teacher"]["tokenizer"],
                *mapping_args, *flag_args(distil), "--batch_size", micro, "--gradient_accumulation_steps", accum,
                "--seed", seed, "--n_gpu", 1 if self.gpus else 0, *(["--bf16"] if self.bf16 else []),
                "--no_progress", *self.cache_args(),
            ]
            tokens = cfg["data"]["token_budget"] * distil.get("n_epoch", 1)
            distil_stage = self.add(Stage(
                f"distil/{row.name}/seed{seed}", f"distil {row.name} seed {seed} (causal_train.py, "
                                                 f"{self.processes} process{'es' if self.processes > 1 else ''})",
                "distil", student, ("model.safetensors", "config.json"),
                [Command("causal_train.py", args, f"distil.{row.name}.seed{seed}", launcher)], deps, kind="distil",
                info={"row": row.name, "seed": seed, "tokens": tokens, "processes": self.processes,
                      "mode": "diito_shared" if row.is_diito else "kd"}))
            for task in self.tasks:
                for ft in range(self.finetune_seeds):
                    self._finetune_stage(row, seed, task, ft, distil_stage, init, counts)

    def _finetune_stage(self, row: Row, seed: int, task: str, ft: int, distil: Stage, init: Stage,
                        counts: Path) -> None:
        cfg = row.config
        spec = cfg["finetune"][task]
        ft_seed = seed + 1000 * ft
        name = task if self.finetune_seeds == 1 else f"{task}-ft{ft + 1}"
        folder = self.out / "finetune" / row.name / f"seed{seed}" / name
        student = distil.folder
        tokenizer = cfg["teacher"]["tokenizer"]
        deps = (distil.id,)
        if task == "iia":
            nm, nm_deps = self.mapping(row, cfg["iia_mapping"], init)
            data_file, data_deps = self.iia_data(row)
            deps += nm_deps + data_deps
            args = ["--teacher_name", cfg["teacher"]["name"], "--student_name", student, "--tokenizer_name", tokenizer,
                    "--neuron_mapping", nm, "--data_file", data_file, "--token_counts", counts,
                    *flag_args({k: v for k, v in spec["args"].items() if k != "seed"}),
                    "--seed", spec["args"].get("seed", 0), "--device", "cuda" if self.gpus else "cpu",
                    *(["--bf16"] if self.bf16 else []), "--no_progress", *self.cache_args(), "--output_dir", folder]
            outputs = ("iia_results.json",)
        else:
            args = ["--model_name_or_path", student, "--tokenizer_name", tokenizer, *flag_args(spec["hub_data"]),
                    *flag_args(spec["args"]), "--seed", ft_seed, "--report_to", "none",
                    *self.trainer_device_args(), *self.cache_args(), "--output_dir", folder]
            outputs = ("eval_results.json",)
        self.add(Stage(
            f"finetune/{row.name}/seed{seed}/{name}", f"{task} {row.name} seed {seed}"
                                                      + (f" fine-tuning seed {ft_seed}" if ft else "") + f" ({spec['script']})",
            "finetune", folder, outputs, [Command(spec["script"], args, f"finetune.{row.name}.seed{seed}.{name}")],
            deps, kind="finetune" if task in TRAINED_TASKS else "plain",
            info={"row": row.name, "seed": seed, "task": task, "ft": ft, "ft_seed": ft_seed,
                  "train_examples": spec["train_examples"], "args": spec["args"]}))

    def ordered(self, only: str | None) -> list[Stage]:
        phases = {"distil": ("shared", "distil"), "finetune": ("finetune",), "tables": ()}.get(
            only, ("shared", "distil", "finetune"))
        order = {"shared": 0, "distil": 1, "finetune": 2}
        return sorted((s for s in self.stages.values() if s.phase in phases), key=lambda s: order[s.phase])


def rescale_mapping(source: Path, target: Path, teacher_config: Path) -> dict:
    """Write `source` (a .nm for BERT-base's 64-dimension heads) with its dimension slices scaled to the
    head width of the teacher in `teacher_config`; layers and heads stay as they are."""
    config = json.loads(teacher_config.read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]

    def scale(match: re.Match) -> str:
        lo, hi = int(match.group(1)), int(match.group(2))
        if (lo * head_dim) % 64 or (hi * head_dim) % 64:
            raise CliError(f"{source}: the slice [{lo}:{hi}] cannot be scaled to {head_dim}-dimension heads")
        return f"$[{lo * head_dim // 64}:{hi * head_dim // 64}]"

    mapping = json.loads(source.read_text())
    for entry in mapping["interchange_variable_mappings"]:
        for side in ("teacher_variable_names", "student_variable_names"):
            entry[side] = [re.sub(r"\$\[(\d+):(\d+)\]$", scale, name) for name in entry[side]]
    atomic_write_text(target, json.dumps(mapping, indent=2) + "\n")
    return {"head_dim": head_dim}


# --- markers -----------------------------------------------------------------------------------
class State:
    """The per-stage records in OUT/state/: `<id>.json` once a stage has finished, `<id>.started.json` while it runs."""

    def __init__(self, out: Path):
        self.folder = out / "state"

    def read(self, stage: Stage, suffix: str = "") -> dict | None:
        try:
            return json.loads((self.folder / f"{stage.marker_name()}{suffix}.json").read_text())
        except (OSError, ValueError):
            return None

    def write(self, stage: Stage, record: dict, suffix: str = "") -> None:
        atomic_write_text(self.folder / f"{stage.marker_name()}{suffix}.json", json.dumps(record, indent=2, default=str))

    def remove(self, stage: Stage, suffix: str = "") -> None:
        (self.folder / f"{stage.marker_name()}{suffix}.json").unlink(missing_ok=True)


def stage_key(plan: Plan, stage: Stage, state: State) -> str | None:
    """The fingerprint of what `stage` would run: its commands (paths relative to OUT and the
    repository) and when each stage it depends on finished; None while a dependency is not done."""
    finished = {}
    for dep in stage.deps:
        marker = state.read(plan.stages[dep])
        if marker is None:
            return None
        finished[dep] = marker["finished"]

    def normal(args: list) -> list[str]:
        kept, skip = [], False
        for a in map(str, args):
            if skip:
                skip = False
                continue
            if a in VOLATILE_FLAGS:
                skip = True
                continue
            kept.append(a.replace(str(plan.out), "$OUT").replace(str(REPO_ROOT), "$REPO"))
        return kept

    commands = [[c.script, *normal(c.args)] for c in stage.commands]
    return fingerprint({"commands": commands, "deps": finished, "work": stage.info.get("work")})


def stage_status(plan: Plan, stage: Stage, state: State, force: bool) -> str:
    """done (a matching record and every output), resume (a distillation with a checkpoint of the
    same command), or run."""
    key = stage_key(plan, stage, state)
    marker = state.read(stage)
    if not force and key is not None and marker is not None and marker.get("key") == key and \
            all((stage.folder / o).exists() for o in stage.outputs):
        return "done"
    if stage.kind == "distil" and not force and key is not None:
        started = state.read(stage, ".started")
        if started and started.get("key") == key and has_checkpoint(stage.folder):
            return "resume"
    return "run"


def has_checkpoint(dump_path: Path) -> bool:
    """Whether causal_train.py left a complete checkpoint (one with its manifest) in `dump_path`."""
    return any((c / "manifest.json").is_file() for c in dump_path.glob("checkpoint-*"))


# --- running -----------------------------------------------------------------------------------
class Runner:
    """Runs the stages in order, skipping finished ones; fine-tuning stages `jobs` at a time."""

    def __init__(self, plan: Plan, force: bool, jobs: int, progress_interval: float):
        self.plan = plan
        self.out = plan.out
        self.state = State(plan.out)
        self.force = force
        self.jobs = jobs
        self.progress_interval = progress_interval
        self.logs = plan.out / "logs"
        self.commands_file = plan.out / "commands.sh"
        self.lock = threading.Lock()
        self.procs: set = set()
        self.stop_signal: int | None = None
        self.device = device_description(plan.gpus)
        self.ran: list[str] = []
        self.skipped: list[str] = []
        gpu_ids = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.gpu_ids = [g.strip() for g in gpu_ids.split(",") if g.strip()] if gpu_ids else \
            [str(i) for i in range(plan.gpus)]
        self.env = dict(os.environ, **CHILD_ENV)
        if plan.tiny:
            self.env.update(OFFLINE_ENV)

    # signals
    def on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            logger.warning("%s: stopping the running commands (each finishes its step and checkpoints where it "
                           "can); run the same command again to continue", signal.Signals(signum).name)
        with self.lock:
            for proc in list(self.procs):
                if proc.poll() is None:
                    try:
                        proc.send_signal(signal.SIGTERM)
                    except OSError:
                        pass

    def header(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.commands_file, "a", encoding="utf-8") as fh:
            fh.write(f"# {dt.datetime.now().isoformat(timespec='seconds')}: "
                     f"{shlex.join(['python', 'scripts/reproduce.py', *sys.argv[1:]])}\n"
                     f"cd {shlex.quote(str(REPO_ROOT))}\n"
                     + "".join(f"export {k}={v}\n" for k, v in CHILD_ENV.items())
                     + ("".join(f"export {k}={v}\n" for k, v in OFFLINE_ENV.items()) if self.plan.tiny else ""))

    def record_command(self, text: str) -> None:
        with self.lock, open(self.commands_file, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")

    def run_command(self, stage: Stage, command: Command, extra: tuple, env: dict) -> float:
        """Run one command, its output to logs/<command.log>.log; progress lines every progress_interval seconds."""
        if self.stop_signal is not None:
            raise Interrupted()
        shown = command.shown(extra)
        prefix = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " if "CUDA_VISIBLE_DEVICES" in env and \
            env.get("CUDA_VISIBLE_DEVICES") != self.env.get("CUDA_VISIBLE_DEVICES") else ""
        self.record_command(prefix + shown)
        log_path = self.logs / f"{command.log}.log"
        start = time.time()
        last_report = start
        total = step = None  # from causal_train.py's log lines
        bar = (None, 0)  # the tqdm bar with the largest total (a training loop's, rather than a save's)
        speed = None
        with open(log_path, "ab") as log:
            log.write(f"\n$ {prefix}{shown}\n".encode())
            log.flush()
            proc = subprocess.Popen(command.argv(extra), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            with self.lock:
                self.procs.add(proc)
            try:
                tail = b""
                while chunk := os.read(proc.stdout.fileno(), 65536):
                    log.write(chunk)
                    text = (tail + chunk).decode("utf-8", errors="replace")
                    tail = chunk[-200:]
                    if (m := TOTAL_LINE.search(text)):
                        total = int(m.group(1))
                    for m in STEP_LINE.finditer(text):
                        step, speed = int(m.group(1)), float(m.group(2))
                    for m in PROGRESS_TQDM.finditer(text):
                        if int(m.group(2)) >= bar[1]:
                            bar = (int(m.group(1)), int(m.group(2)))
                    now = time.time()
                    if now - last_report >= self.progress_interval:
                        last_report = now
                        log.flush()
                        shown_step, shown_total = (step, total) if total else bar
                        self.report_progress(stage, shown_step, shown_total, speed, now - start)
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
                with self.lock:
                    self.procs.discard(proc)
        if self.stop_signal is not None:
            raise Interrupted()
        if rc != 0:
            lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-12:]
            raise StageFailed(f"{stage.title}: {command.script} exited with status {rc}; its output is in {log_path}, "
                              f"ending with:\n" + "\n".join("    " + line[-300:] for line in lines)
                              + f"\nThe command was:\n  {prefix}{shown}")
        stage.info["last_speed"] = speed
        return time.time() - start

    def report_progress(self, stage: Stage, step, total, speed, elapsed: float) -> None:
        parts = [f"{stage.title}: running for {format_seconds(elapsed)}"]
        if step is not None and total:
            parts.append(f"step {step} of {total} ({100 * step / total:.0f}%)")
            if step > 0:
                parts.append(f"about {format_seconds(elapsed * (total - step) / step)} left")
        if speed:
            parts.append(f"{speed:,.0f} tok/s")
        logger.info("%s", ", ".join(parts))

    def run_stage(self, stage: Stage, index: int, count: int, slot: int = 0) -> None:
        status = stage_status(self.plan, stage, self.state, self.force)
        if status == "done":
            self.skipped.append(stage.id)
            logger.info("[%d/%d] %s: done already, skipping", index, count, stage.title)
            return
        key = stage_key(self.plan, stage, self.state)
        if key is None:
            missing = [d for d in stage.deps if self.state.read(self.plan.stages[d]) is None]
            raise StageFailed(f"{stage.title}: needs {', '.join(missing)}, not done yet")
        logger.info("[%d/%d] %s%s", index, count, stage.title, " (resuming from its last checkpoint)"
                    if status == "resume" else "")
        self.state.remove(stage)
        env = dict(self.env)
        if self.plan.gpus and stage.phase == "finetune" and self.jobs > 1:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_ids[slot % len(self.gpu_ids)]
        if self.plan.gpus == 0:
            threads = max(1, self.plan.args.threads // (self.jobs if stage.phase == "finetune" else 1))
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        start = time.time()
        extra: tuple = ()
        if stage.kind == "distil":
            extra = ("--resume",) if status == "resume" else ("--force",)
            if status == "run" and has_checkpoint(stage.folder):
                logger.warning("%s: the checkpoints in %s were written by another command (another config, number of "
                               "GPUs or precision): starting afresh", stage.title, stage.folder)
            self.state.write(stage, {"key": key, "started": now_iso()}, ".started")
        elif stage.kind == "finetune" and (stage.folder / "train_results.json").exists():
            extra = ("--overwrite_output_dir",)  # a finished training whose stage did not finish: train afresh
        result = {}
        if stage.work is not None:
            self.record_command(f"# in scripts/reproduce.py: {stage.info['work']}")
            result = stage.work(stage.folder) or {}
        for command in stage.commands:
            self.run_command(stage, command, extra if command is stage.commands[0] else (), env)
        missing = [o for o in stage.outputs if not (stage.folder / o).exists()]
        if missing:
            raise StageFailed(f"{stage.title}: finished without writing {', '.join(missing)} in {stage.folder}")
        if stage.kind == "finetune":
            for checkpoint in stage.folder.glob("checkpoint-*"):  # the results are what the tables need
                shutil.rmtree(checkpoint, ignore_errors=True)
        seconds = time.time() - start
        gpus = (self.plan.processes if stage.phase == "distil" else 1) if self.plan.gpus else 0
        self.state.write(stage, {"stage": stage.id, "key": key, "seconds": round(seconds, 2), "finished": now_iso(),
                                 "device": self.device, "gpus": gpus, "resumed": status == "resume",
                                 "speed_tok_s": stage.info.get("last_speed"), **result})
        self.state.remove(stage, ".started")
        self.ran.append(stage.id)
        logger.info("[%d/%d] %s: done in %s", index, count, stage.title, format_seconds(seconds))

    def run(self, stages: list[Stage]) -> None:
        self.header()
        sequential = [s for s in stages if s.phase != "finetune"]
        parallel = [s for s in stages if s.phase == "finetune"]
        count = len(stages)
        for i, stage in enumerate(sequential, 1):
            self.run_stage(stage, i, count)
        if not parallel:
            return
        if self.jobs == 1:
            for i, stage in enumerate(parallel, len(sequential) + 1):
                self.run_stage(stage, i, count)
            return
        free = list(range(self.jobs))
        pending = list(enumerate(parallel, len(sequential) + 1))
        running = {}
        errors = []
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            while pending or running:
                while pending and free and not errors and self.stop_signal is None:
                    i, stage = pending.pop(0)
                    slot = free.pop(0)
                    running[pool.submit(self.run_stage, stage, i, count, slot)] = slot
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    free.append(running.pop(future))
                    if future.exception() is not None:
                        errors.append(future.exception())
        if errors:
            raise errors[0]


def emit(text: str) -> None:
    """Print `text` to stdout; a closed pipe (`| head`) ends the program quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def now_iso() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


# --- the output folder -------------------------------------------------------------------------
def check_out_folder(out: Path, preset: str, rows: list[Row], force: bool) -> dict | None:
    """CliError when --out holds something else than this reproduction; returns its manifest (or None)."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a folder")
    manifest_path = out / MANIFEST
    if not out.exists() or not any(out.iterdir()):
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise CliError(f"--out {out} is not empty and holds no {MANIFEST}: it is not a folder of scripts/reproduce.py; "
                       f"choose another --out") from None
    except (OSError, ValueError) as err:
        raise CliError(f"--out {out}: cannot read {manifest_path} ({err}); choose another --out") from None
    if not isinstance(manifest, dict) or manifest.get("tool") != MANIFEST_TOOL:
        raise CliError(f"--out {out}: {manifest_path} was not written by scripts/reproduce.py; choose another --out")
    if manifest.get("preset") != preset:
        raise CliError(f"--out {out} holds a reproduction with --preset {manifest.get('preset')}, not {preset}; "
                       f"choose another --out")
    if not force:
        for row in rows:
            recorded = manifest.get("rows", {}).get(row.name)
            if recorded is not None and recorded != row.fingerprint:
                raise CliError(f"--out {out} holds results of row {row.name} made with another version of {row.path}; "
                               f"choose another --out, or pass --force to redo every stage with the config as it is now")
    return manifest


def write_manifest(out: Path, preset: str, rows: list[Row], manifest: dict | None) -> None:
    record = manifest or {"tool": MANIFEST_TOOL, "version": 1, "preset": preset, "created": now_iso(), "rows": {}}
    record["rows"].update({row.name: row.fingerprint for row in rows})
    record["updated"] = now_iso()
    atomic_write_text(out / MANIFEST, json.dumps(record, indent=2) + "\n")


# --- the hub -----------------------------------------------------------------------------------
# Dataset names -> the repositories the scripts load them from (finetune_common.HUB_ALIASES, binarized_data.py).
HUB_DATASETS = {"wikitext": "Salesforce/wikitext", "glue": "nyu-mll/glue", "conll2003": "eriktks/conll2003",
                "squad": "rajpurkar/squad"}


def hub_names(plan: Plan, tasks: list[str]) -> dict[str, set[str]]:
    """{"model": {...}, "dataset": {...}}: what the plan reads from the hub (every name that is not a local path)."""
    names: dict[str, set[str]] = {"model": set(), "dataset": set()}
    for row in plan.rows:
        cfg = row.config
        for name in (cfg["teacher"]["name"], cfg["teacher"]["tokenizer"]):
            if not is_local(name):
                names["model"].add(name)
        if not cfg["data"].get("file_path"):
            names["dataset"].update(d.split(":")[0] for d in cfg["data"]["datasets"])
        for task in tasks:
            hub = cfg["finetune"][task]["hub_data"]
            if task in GLUE_TASKS:
                if "train_file" not in hub:
                    names["dataset"].add("glue")
            elif "dataset_name" in hub:
                names["dataset"].add(hub["dataset_name"])
    return names


def is_local(name: str) -> bool:
    """Whether a model or tokenizer name means a folder on disk rather than a hub repository."""
    return str(name).startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def check_hub(plan: Plan, tasks: list[str], cache_dir: str | None) -> None:
    """One clear CliError, before anything runs, when the plan needs the hub and cannot have it:
    offline (HF_HUB_OFFLINE=1) with names missing from the cache, or online with the hub unreachable."""
    names = hub_names(plan, tasks)
    if not names["model"] and not names["dataset"]:
        return
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_ENV)
    listed = ", ".join([*(f"model {n}" for n in sorted(names["model"])), *(f"dataset {n}" for n in sorted(names["dataset"]))])
    if offline:
        missing = [f"model {n}" for n in sorted(names["model"]) if not model_cached(n, cache_dir)]
        missing += [f"dataset {n}" for n in sorted(names["dataset"]) if not dataset_cached(n, cache_dir)]
        if missing:
            raise CliError(f"offline (HF_HUB_OFFLINE=1) and not in the cache: {', '.join(missing)}; run once with "
                           f"network access to fill the cache, or use --preset tiny for the offline chain")
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    match = re.match(r"^(https?)://([^/:]+)(?::(\d+))?", endpoint)
    host = match.group(2) if match else "huggingface.co"
    port = int(match.group(3)) if match and match.group(3) else (80 if match and match.group(1) == "http" else 443)
    import socket

    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        raise CliError(f"cannot reach the hub at {host}:{port} ({err.strerror or err}); the rows need {listed}. "
                       f"Set HF_HUB_OFFLINE=1 to use a filled cache instead") from None


def model_cached(name: str, cache_dir: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("config.json", "tokenizer_config.json", "vocab.txt"):
        found = try_to_load_from_cache(name, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return True
    return False


def dataset_cached(name: str, cache_dir: str | None) -> bool:
    """Whether a dataset seems to be in the hub cache or in `datasets`' cache (by folder name)."""
    repo = HUB_DATASETS.get(name, name)
    candidates = []
    hub_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", hub_home / "hub"))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", hub_home / "datasets"))
    for root in filter(None, (cache_dir and Path(cache_dir), hub_cache, datasets_cache)):
        candidates += [root / f"datasets--{r.replace('/', '--')}" for r in {repo, name}]
        candidates += [root / r.replace("/", "___") for r in {repo, name}]
    return any(c.is_dir() for c in candidates)


# --- estimate ----------------------------------------------------------------------------------
def read_speed(bench_json: str | None, bf16: bool) -> tuple[dict, str]:
    """Real tokens/s per GPU for standard KD ('kd') and DIITO ('diito_shared'), and where they come from."""
    if not bench_json:
        return dict(DEFAULT_SPEED), DEFAULT_SPEED_SOURCE
    path = Path(bench_json)
    try:
        rows = json.loads(path.read_text())["rows"]
    except FileNotFoundError:
        raise CliError(f"--bench_json {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CliError(f"--bench_json {path}: not a bench/bench_train_step.py --json_out file ({err})") from None
    dtype = "bf16" if bf16 else "fp32"
    speed = {}
    for mode, fallbacks in (("kd", ("kd",)), ("diito_shared", ("diito_shared", "diito_plain"))):
        for name in fallbacks:
            found = [r for r in rows if r.get("mode") == name and r.get("tok_s")]
            found = [r for r in found if r.get("dtype") == dtype] or found
            if found:
                speed[mode] = float(found[0]["tok_s"])
                break
        else:
            raise CliError(f"--bench_json {path}: no row of mode {mode} with tok_s")
    return speed, (f"{path}: bench_train_step.py rows kd {speed['kd']:,.0f} and DIITO {speed['diito_shared']:,.0f} "
                   f"real tokens/s ({dtype} preferred)")


def estimate(stages: list[Stage], statuses: dict, speed: dict, source: str) -> list[str]:
    """Lines of the GPU-hours estimate for `stages` (those not done yet, and all)."""
    def distil_hours(s: Stage) -> float:
        return s.info["tokens"] / speed[s.info["mode"]] / 3600

    def finetune_hours(s: Stage) -> float:
        args = s.info["args"]
        if s.info["task"] not in TRAINED_TASKS:
            return 0.0
        length = args.get("max_seq_length", 384 if s.info["task"] == "squad" else 128)
        tokens = s.info["train_examples"] * args.get("num_train_epochs", 1) * length
        return tokens / speed["kd"] / 3600

    lines = [f"Estimate of the compute (tokens/s per GPU from {source}):"]
    for label, pick in (("still to run", lambda s: statuses[s.id] != "done"), ("whole chain", lambda s: True)):
        d = [s for s in stages if s.phase == "distil" and pick(s)]
        f = [s for s in stages if s.phase == "finetune" and pick(s)]
        dh, fh = sum(map(distil_hours, d)), sum(map(finetune_hours, f))
        lines.append(f"  {label}: distillation {len(d)} run(s), {format_hours(dh)} GPU-hours "
                     f"(token budget x epochs / tokens per second); fine-tuning {len(f)} run(s), at most "
                     f"{format_hours(fh)} GPU-hours; in all {format_hours(dh + fh)} GPU-hours: about "
                     f"{format_hours(dh + fh)} h on 1 GPU, {format_hours((dh + fh) / 8)} h on 8")
    lines.append("  Distillation assumes the speed scales with the number of GPUs (torchrun, DDP). Fine-tuning is an "
                 "upper bound: every example padded to --max_seq_length, at the distillation's standard-KD speed "
                 "(which also runs the 12-layer teacher); evaluation-only tasks (mlm, iia) take minutes and are left out.")
    return lines


# --- listing -----------------------------------------------------------------------------------
def list_rows(config_dir: Path) -> str:
    """A markdown table of every row with its published numbers ((-) where there are none)."""
    rows = load_rows(available_rows(config_dir), config_dir)
    headers = ["row", "model", "tokens", "mapping", "GLUE avg", *[h for _, h in GLUE_COLUMNS], "CoNLL F1",
               "SQuAD EM/F1", "perplexity"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]

    def cell(value) -> str:
        return "(-)" if value is None else f"{value:.2f}"

    for row in rows:
        cfg, pub = row.config, row.config["published"]
        glue = pub["glue"] or {}
        nm = cfg["neuron_mapping"]
        mapping = "-" if nm is None else nm.get("file", nm.get("alignment", "")).replace("training_configs/", "")
        squad = pub["squad"] or {}
        lines.append("| " + " | ".join([row.name, cfg["label"], cfg["data"]["training_tokens"], mapping,
                                 cell(glue.get("average")), *[cell(glue.get(t)) for t, _ in GLUE_COLUMNS],
                                 cell((pub["conll2003"] or {}).get("f1")),
                                 f"{cell(squad.get('exact_match'))}/{cell(squad.get('f1'))}",
                                 cell(pub["perplexity"])]) + " |")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--rows", default=None, help="Comma-separated row names (training_configs/paper/<row>.json); --list shows them.")
    a("--seeds", type=int, default=3, help="Distillation seeds per row, 1..N (default 3); the tables give mean +- std "
                                           "over them.")
    a("--out", default=None, help="Output folder: every result, OUT/commands.sh, OUT/logs/, OUT/paper_tables.md. "
                                  "Run the same command again to continue an interrupted reproduction.")
    a("--preset", choices=("paper", "tiny"), default="paper",
      help="paper (default): the configs as they are, hub models and data. tiny: local stand-ins and a few steps of "
           "every stage, offline, on the CPU in minutes (the chain's proof, not the paper's numbers).")
    a("--only", choices=("distil", "finetune", "tables"), default=None,
      help="distil: the shared stages and the distillations; finetune: fine-tuning and evaluation of students "
           "already distilled, then the tables; tables: only rewrite OUT/paper_tables.md from what is there.")
    a("--tasks", default=None, help="Comma-separated tasks to fine-tune/evaluate (default all): "
                                    + ", ".join(ALL_TASKS) + "; 'glue' stands for the nine GLUE tasks.")
    a("--finetune_seeds", type=int, default=1,
      help="Fine-tuning runs per student and task (default 1, seeded by the student's seed; more: seeds s+1000, "
           "s+2000, ...); a student's score is their mean.")
    a("--dry_run", action="store_true", help="Print every command (marked done / to run / resume) and the compute "
                                             "estimate; run and write nothing.")
    a("--list", action="store_true", help="Print the rows with the paper's published numbers, and exit.")
    a("--gpus", type=int, default=None, help="GPUs to use (default: every GPU torch sees; 0: the CPU). Distillation "
                                            "runs under torchrun over all of them.")
    a("--jobs", type=int, default=None, help="Fine-tuning runs at once (default: one per GPU, 1 on the CPU); each gets "
                                            "one GPU.")
    a("--precision", choices=("auto", "fp32", "bf16"), default="auto",
      help="auto (default): bf16 on GPUs, fp32 on the CPU.")
    a("--bench_json", default=None, help="A bench/bench_train_step.py --json_out file measured on your GPU: its tokens/s "
                                         "drive the --dry_run estimate (default: the H200 figures of docs/gpu.md).")
    a("--cache_dir", default=None, help="Hub cache folder, passed to every script.")
    a("--config_dir", default=str(CONFIG_DIR), help="Folder of row configs (default training_configs/paper).")
    a("--force", action="store_true", help="Redo every stage, and accept an OUT whose rows were made with older "
                                           "configs.")
    a("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
      help="CPU runs only: threads per process, shared among --jobs (default: half the cores; processes fighting "
           "over the same cores run several times slower).")
    a("--progress_interval", type=float, default=60.0, help="Seconds between progress lines of a running command "
                                                             "(default 60).")
    args = parser.parse_args(argv)
    for flag in ("seeds", "finetune_seeds", "threads"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.gpus is not None and args.gpus < 0:
        raise CliError(f"--gpus must be 0 or more, got {args.gpus}")
    if args.jobs is not None and args.jobs < 1:
        raise CliError(f"--jobs must be at least 1, got {args.jobs}")
    if not args.list:
        if not args.rows:
            raise CliError("--rows is required (comma-separated row names; --list shows them)")
        if not args.out:
            raise CliError("--out is required (the folder for this reproduction)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run (or --dry_run, or --list) the reproduction `argv` asks for; returns what ran and what was skipped."""
    args = parse_args(argv)
    config_dir = Path(args.config_dir)
    if args.list:
        emit(list_rows(config_dir))
        return {}
    names = list(dict.fromkeys(n.strip() for n in args.rows.split(",") if n.strip()))
    if not names:
        raise CliError("--rows is empty")
    rows = load_rows(names, config_dir)
    tasks = parse_tasks(args.tasks)
    out = Path(args.out).resolve()
    manifest = check_out_folder(out, args.preset, rows, args.force)
    gpus = args.gpus if args.gpus is not None else (0 if args.preset == "tiny" else detect_gpus())
    if args.preset == "tiny" and gpus:
        raise CliError("--preset tiny runs on the CPU; leave --gpus out (or 0)")
    jobs = args.jobs or max(1, gpus)
    plan = Plan(args, rows, tasks, out, gpus)
    stages = plan.ordered(args.only)
    state = State(out)
    statuses = {}
    for stage in plan.stages.values():
        statuses[stage.id] = stage_status(plan, stage, state, args.force)

    if args.dry_run:
        emit(f"# scripts/reproduce.py --dry_run: {len(stages)} stages for rows {', '.join(names)}, seeds "
              f"1..{args.seeds}, tasks {', '.join(tasks)}; preset {args.preset}; "
              f"{gpus} GPU(s) ({'torchrun --nproc_per_node ' + str(gpus) if gpus > 1 else 'one process'}), "
              f"{jobs} fine-tuning job(s) at once")
        emit(f"cd {shlex.quote(str(REPO_ROOT))}")
        for stage in stages:
            emit(f"# [{statuses[stage.id]}] {stage.title}")
            if stage.work is not None:
                emit(f"#   in scripts/reproduce.py: {stage.info['work']}")
            for i, command in enumerate(stage.commands):
                extra = ()
                if stage.kind == "distil" and i == 0:
                    extra = ("--resume",) if statuses[stage.id] == "resume" else ("--force",)
                emit(command.shown(extra))
        speed, source = read_speed(args.bench_json, plan.bf16)
        for line in estimate(stages, statuses, speed, source):
            emit("# " + line)
        return {"stages": [s.id for s in stages], "statuses": statuses}

    if args.only == "finetune":
        missing = [s.title for s in plan.stages.values() if s.phase == "distil" and statuses[s.id] != "done"]
        if missing:
            raise CliError(f"--only finetune needs the students distilled first; not done: {', '.join(missing[:4])}"
                           + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                           + " (run without --only, or with --only distil)")
    read_speed(args.bench_json, plan.bf16)  # a bad --bench_json is an error before anything runs
    if args.only != "tables" and any(statuses[s.id] != "done" for s in stages):
        check_hub(plan, tasks, args.cache_dir)

    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, args.preset, rows, manifest)
    runner = Runner(plan, args.force, jobs, args.progress_interval)
    previous = {sig: signal.signal(sig, runner.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    start = time.time()
    try:
        if stages:
            runner.run(stages)
    except Interrupted:
        logger.error("stopped by %s after %s; run the same command again to continue (finished stages are skipped, "
                     "a distillation resumes from its last checkpoint)",
                     signal.Signals(runner.stop_signal).name, format_seconds(time.time() - start))
        sys.exit(128 + runner.stop_signal)
    except StageFailed as err:
        logger.error("%s", err)
        logger.error("fix the cause and run the same command again: finished stages are skipped")
        sys.exit(1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    tables = write_tables(plan, State(out))
    logger.info("finished in %s: ran %d stage(s), skipped %d found done; tables in %s", format_seconds(time.time() - start),
                len(runner.ran), len(runner.skipped), tables)
    return {"ran": runner.ran, "skipped": runner.skipped, "tables": str(tables)}


if __name__ == "__main__":
    run_cli(main)
