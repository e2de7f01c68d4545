"""The plan of `scripts/reproduce.py`: every stage of the chain as commands of the project's scripts,
with the devices they run on. Builds command lines; runs nothing."""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.reproduce.configs import TINY, TRAINED_TASKS, Row, tiny_row
from atomic_files import atomic_write_text
from utils import CliError, REPO_ROOT


# Flags that change where things are cached or how progress is shown, not what is computed:
# left out of a stage's fingerprint, so that changing them does not redo finished work.
VOLATILE_FLAGS = {"--cache_dir"}


# --- what a stage is ---------------------------------------------------------------------------
@dataclass
class CommandLine:
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
                       [CommandLine("scripts/reproduce_tiny.py", ["--out", self.standins, "--seed", 0], "shared.standins")]))
        steps = TINY["teacher_steps"]
        self.add(Stage("shared/teacher", f"tiny teacher: BERT from standins/teacher_config.json, {steps} steps "
                                         f"(run_mlm.py --do_train)", "shared", self.tiny_teacher,
                       ("model.safetensors", "config.json"),
                       [CommandLine("run_mlm.py", [
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
            [CommandLine("scripts/binarized_data.py", [*source, "--split", data["split"], "--field_name", data["field_name"],
                                                   "--tokenizer_type", cfg["teacher"]["type"], "--tokenizer_name",
                                                   tokenizer, "--dump_file", folder / "binarized_text"],
                     f"shared.data.{folder.name}.binarize"),
             CommandLine("scripts/token_counts.py", ["--data_file", bin_file, "--token_counts_dump", counts],
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
            [CommandLine("scripts/extract_distilbert.py", [
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
            (target.name,), [CommandLine("scripts/make_mapping.py", ["--teacher", cfg["teacher"]["name"], "--student", init.folder,
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
            [CommandLine("scripts/binarized_data.py", [
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
                [CommandLine("causal_train.py", args, f"distil.{row.name}.seed{seed}", launcher)], deps, kind="distil",
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
            "finetune", folder, outputs, [CommandLine(spec["script"], args, f"finetune.{row.name}.seed{seed}.{name}")],
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

