"""The paper's table rows for `scripts/reproduce.py`: reading and checking `training_configs/paper/*.json`,
the evaluation tasks, and the `tiny` preset's local stand-ins.

A row config holds everything that makes one row of the paper's tables (teacher, data recipe,
student depth and blocks, neuron mapping, distillation flags, fine-tuning settings per task) and
the paper's published numbers for it (null where the paper's numbers are not known here). Every
mistake in a config is a `CliError` naming the file and the field, raised before anything runs.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from pipelines.stages import fingerprint
from utils import REPO_ROOT, CliError

CONFIG_DIR = REPO_ROOT / "training_configs" / "paper"

GLUE_TASKS = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")
# The GLUE columns of the seed README's table (WNLI is run, but the table leaves it out, as GLUE papers do).
GLUE_COLUMNS = (("cola", "CoLA"), ("mnli", "MNLI"), ("mrpc", "MRPC"), ("qnli", "QNLI"), ("qqp", "QQP"),
                ("rte", "RTE"), ("sst2", "SST-2"), ("stsb", "STS-B"))
ALL_TASKS = GLUE_TASKS + ("conll2003", "squad", "mlm", "iia")
TASK_GROUPS = {"glue": GLUE_TASKS, "all": ALL_TASKS}
TASK_SCRIPTS = {**{t: "run_glue.py" for t in GLUE_TASKS}, "conll2003": "run_ner.py", "squad": "run_qa.py",
                "mlm": "run_mlm.py", "iia": "run_iia.py"}
PUBLISHED_GLUE = ("average",) + tuple(t for t, _ in GLUE_COLUMNS) + ("wnli",)
TRAINED_TASKS = GLUE_TASKS + ("conll2003", "squad")  # fine-tuned; mlm and iia only evaluate the student
METHODS = ("distilbert", "diito")

# Field -> type(s) of every row config. A dict value is a nested section; `None` among the types: may be null.
SCHEMA = {
    "row": str,
    "label": str,
    "method": str,
    "teacher": {"type": str, "name": str, "tokenizer": str},
    "data": {"name": str, "datasets": list, "split": str, "field_name": str, "training_tokens": str,
             "token_budget": (int, float)},
    "student": {"type": str, "num_layers": int, "teacher_blocks": list, "vocab_transform": bool},
    "neuron_mapping": (dict, None),
    "distillation": {"mlm": bool, "alpha_ce": (int, float), "alpha_mlm": (int, float), "alpha_cos": (int, float),
                     "alpha_clm": (int, float), "alpha_causal_ce": (int, float), "alpha_causal_cos": (int, float),
                     "interchange_prop": (int, float), "interchange_consecutive_only": bool,
                     "freeze_pos_embs": bool, "learning_rate": (int, float), "n_epoch": int,
                     "effective_batch": int, "batch_size": int},
    "finetune": dict,
    "iia_mapping": (dict, None),
    "published": {"source": str, "glue": (dict, None), "conll2003": (dict, None), "squad": (dict, None),
                  "perplexity": (int, float, None)},
}
TASK_SCHEMA = {"script": str, "args": dict, "hub_data": dict, "train_examples": int}
# Flags reproduce.py sets itself (paths, seeds, devices): a config that sets them is refused.
RESERVED = {"dump_path", "data_file", "token_counts", "student_config", "student_pretrained_weights", "teacher_name",
            "teacher_type", "student_type", "tokenizer_name", "neuron_mapping", "seed", "n_gpu", "force", "resume",
            "gradient_accumulation_steps", "model_name_or_path", "output_dir", "student_name", "train_file",
            "validation_file", "overwrite_output_dir"}


@dataclass(frozen=True)
class Row:
    """One row config: its name, the file it came from, the parsed JSON and its fingerprint."""

    name: str
    path: Path
    config: dict
    fingerprint: str

    @property
    def label(self) -> str:
        return self.config["label"]

    @property
    def is_diito(self) -> bool:
        return self.config["method"] == "diito"


def available_rows(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The row names in `config_dir` (file stems), sorted."""
    if not config_dir.is_dir():
        raise CliError(f"--config_dir {config_dir}: no such folder")
    return sorted(p.stem for p in config_dir.glob("*.json"))


def _type_name(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is None else t.__name__ for t in types)


def _check_section(section: dict, schema: dict, where: str, path: Path) -> None:
    for field, types in schema.items():
        name = f"{where}.{field}" if where else field
        if not isinstance(section, dict) or field not in section:
            raise CliError(f"{path}: missing field {name}")
        value = section[field]
        if isinstance(types, dict):
            if not isinstance(value, dict):
                raise CliError(f"{path}: field {name} must be an object")
            _check_section(value, types, name, path)
            continue
        allowed = types if isinstance(types, tuple) else (types,)
        ok = (value is None and None in allowed) or any(
            t is not None and isinstance(value, t) and not (t in (int, float) and isinstance(value, bool))
            for t in allowed)
        if not ok:
            raise CliError(f"{path}: field {name} is {value!r}, expected {_type_name(types)}")


def _check_mapping(spec: dict | None, field: str, path: Path) -> None:
    if spec is None:
        return
    if set(spec) not in ({"file"}, {"alignment"}):
        raise CliError(f"{path}: field {field} must be {{\"file\": \"training_configs/....nm\"}} or "
                       f"{{\"alignment\": \"single_middle|single_middle_late|multiple_single_middle_late|"
                       f"multiple_single_multilayer\"}}, got {spec!r}")
    if "file" in spec and not (REPO_ROOT / spec["file"]).is_file():
        raise CliError(f"{path}: field {field}.file: {spec['file']} does not exist")
    if "alignment" in spec and spec["alignment"] not in (
            "single_middle", "single_middle_late", "multiple_single_middle_late", "multiple_single_multilayer"):
        raise CliError(f"{path}: field {field}.alignment {spec['alignment']!r} is not one of scripts/make_mapping.py's")


def validate(config: dict, path: Path) -> None:
    """CliError naming `path` and the field when `config` is not a complete, consistent row config."""
    if not isinstance(config, dict):
        raise CliError(f"{path}: expected a JSON object")
    _check_section(config, SCHEMA, "", path)
    if config["row"] != path.stem:
        raise CliError(f"{path}: field row is {config['row']!r}, but the file is named {path.stem!r}")
    if config["method"] not in METHODS:
        raise CliError(f"{path}: field method is {config['method']!r}, expected one of {', '.join(METHODS)}")
    student = config["student"]
    if len(student["teacher_blocks"]) != student["num_layers"]:
        raise CliError(f"{path}: field student.teacher_blocks lists {len(student['teacher_blocks'])} blocks for "
                       f"student.num_layers {student['num_layers']}")
    if not config["data"]["datasets"] or not all(isinstance(d, str) for d in config["data"]["datasets"]):
        raise CliError(f"{path}: field data.datasets must be a non-empty list of dataset names")
    distil = config["distillation"]
    causal = distil["alpha_causal_ce"] > 0 or distil["alpha_causal_cos"] > 0
    if config["method"] == "diito" and not causal:
        raise CliError(f"{path}: method diito needs distillation.alpha_causal_ce or alpha_causal_cos above 0")
    if config["method"] == "distilbert" and causal:
        raise CliError(f"{path}: method distilbert (standard distillation) must have alpha_causal_ce and "
                       f"alpha_causal_cos 0")
    if causal and config["neuron_mapping"] is None:
        raise CliError(f"{path}: field neuron_mapping is null, but DIITO needs one")
    _check_mapping(config["neuron_mapping"], "neuron_mapping", path)
    _check_mapping(config["iia_mapping"], "iia_mapping", path)
    for key in set(distil) & RESERVED:
        raise CliError(f"{path}: field distillation.{key} is set by scripts/reproduce.py itself; remove it")
    for task in ALL_TASKS:
        if task not in config["finetune"]:
            raise CliError(f"{path}: missing field finetune.{task}")
        _check_section(config["finetune"][task], TASK_SCHEMA, f"finetune.{task}", path)
        spec = config["finetune"][task]
        if spec["script"] != TASK_SCRIPTS[task]:
            raise CliError(f"{path}: field finetune.{task}.script is {spec['script']!r}, expected {TASK_SCRIPTS[task]}")
        reserved = RESERVED - {"seed"} if task == "iia" else RESERVED  # IIA's seed fixes its pairs for every student
        for key in set(spec["args"]) & reserved:
            raise CliError(f"{path}: field finetune.{task}.args.{key} is set by scripts/reproduce.py itself; remove it")
    if config["iia_mapping"] is None:
        raise CliError(f"{path}: field iia_mapping is null; run_iia.py needs a mapping")
    for section, keys in (("glue", PUBLISHED_GLUE), ("conll2003", ("f1",)), ("squad", ("exact_match", "f1"))):
        values = config["published"][section] or {}
        for key, value in values.items():
            if key not in keys:
                raise CliError(f"{path}: field published.{section}.{key} is not one of {', '.join(keys)}")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise CliError(f"{path}: field published.{section}.{key} is {value!r}, expected a number or null")


def load_rows(names: list[str], config_dir: Path = CONFIG_DIR) -> list[Row]:
    """The rows `names` from `config_dir`, each checked; CliError for an unknown name or a bad config."""
    known = available_rows(config_dir)
    rows = []
    for name in names:
        if name not in known:
            raise CliError(f"--rows: unknown row {name!r}; known rows ({len(known)}): {', '.join(known)} "
                           f"(python scripts/reproduce.py --list shows them with their published numbers)")
        path = config_dir / f"{name}.json"
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise CliError(f"{path}: cannot read it ({err})") from None
        except json.JSONDecodeError as err:
            raise CliError(f"{path}: not valid JSON ({err})") from None
        validate(config, path)
        rows.append(Row(name, path, config, fingerprint(config)))
    recipes = {}
    for row in rows:  # rows sharing a data name share its binarized files: they must mean the same data
        data = row.config["data"]
        key = (data["name"], row.config["teacher"]["tokenizer"])
        recipe = {k: data[k] for k in ("datasets", "split", "field_name")}
        if key in recipes and recipes[key][1] != recipe:
            raise CliError(f"{row.path}: data.name {data['name']!r} is also used by {recipes[key][0]} with other "
                           f"datasets/split/field; give one of them another data.name")
        recipes.setdefault(key, (row.path, recipe))
    return rows


def parse_tasks(spec: str | None) -> list[str]:
    """The tasks of a --tasks value (comma-separated names or the groups glue, all), in the canonical order."""
    if spec is None:
        return list(ALL_TASKS)
    chosen = set()
    for name in (n.strip().lower() for n in spec.split(",")):
        if not name:
            continue
        if name in TASK_GROUPS:
            chosen.update(TASK_GROUPS[name])
        elif name in ALL_TASKS:
            chosen.add(name)
        else:
            raise CliError(f"--tasks: unknown task {name!r}; choose from {', '.join(ALL_TASKS)} or the groups "
                           f"{', '.join(TASK_GROUPS)}")
    if not chosen:
        raise CliError("--tasks is empty")
    return [t for t in ALL_TASKS if t in chosen]


# --- the tiny preset ---------------------------------------------------------------------------
# Sizes of the CPU proof of the chain: every stage runs, each for a handful of steps.
TINY = {
    "teacher_steps": 40,
    "distil_steps": 40,
    "distil_batch": 8,
    "checkpoint_interval": 10,
    "finetune_steps": 6,
    "finetune_batch": 8,
    "max_seq_length": 64,
    "iia_pairs": 64,
    "token_budget": 50_000,
}


def tiny_row(row: Row, standins: Path, teacher: Path) -> Row:
    """`row` with the tiny preset's local stand-ins: the teacher trained from `standins/teacher_config.json`
    (folder `teacher`), the stand-ins' tokenizer, text and task files, and a few steps of everything.

    The row's recipe otherwise stays (objectives, flags, student depth and blocks, mapping); the
    name, label and published numbers are kept, so the tables are laid out as for the paper.
    """
    cfg = copy.deepcopy(row.config)
    cfg["teacher"] = {"type": "bert", "name": str(teacher), "tokenizer": str(standins / "tokenizer")}
    cfg["data"] = {"name": "tiny-text", "file_path": str(standins / "text" / "train.txt"), "datasets": [],
                   "split": "train", "field_name": "text",
                   "training_tokens": f"tiny (for {cfg['data']['training_tokens']})",
                   "token_budget": TINY["token_budget"]}
    distil = cfg["distillation"]
    distil.update(effective_batch=TINY["distil_batch"], batch_size=TINY["distil_batch"], n_epoch=1,
                  max_steps=TINY["distil_steps"], checkpoint_interval=TINY["checkpoint_interval"],
                  log_interval=5, num_workers=0, save_total_limit=2)
    n = TINY["finetune_steps"]
    common = {"max_steps": n, "per_device_train_batch_size": TINY["finetune_batch"], "per_device_eval_batch_size": 32,
              "save_strategy": "no", "logging_steps": 2, "learning_rate": 1e-3, "dataloader_num_workers": 0}
    tasks = cfg["finetune"]
    for task in GLUE_TASKS:
        folder = standins / "glue" / task
        tasks[task]["args"].update(common, max_seq_length=TINY["max_seq_length"])
        tasks[task]["args"].pop("save_total_limit", None)
        tasks[task]["hub_data"] = {"train_file": str(folder / "train.csv"), "validation_file": str(folder / "dev.csv")}
        if task == "mnli":
            tasks[task]["hub_data"]["validation_mismatched_file"] = str(folder / "dev_mismatched.csv")
    tasks["conll2003"]["args"].update(common, max_seq_length=TINY["max_seq_length"])
    tasks["conll2003"]["args"].pop("save_total_limit", None)
    tasks["conll2003"]["hub_data"] = {"train_file": str(standins / "conll2003" / "train.json"),
                                      "validation_file": str(standins / "conll2003" / "validation.json")}
    tasks["squad"]["args"].update(common, max_seq_length=TINY["max_seq_length"], doc_stride=16)
    tasks["squad"]["args"].pop("save_total_limit", None)
    tasks["squad"]["hub_data"] = {"train_file": str(standins / "squad" / "train.json"),
                                  "validation_file": str(standins / "squad" / "dev.json")}
    tasks["mlm"]["args"].update(per_device_eval_batch_size=32, max_seq_length=TINY["max_seq_length"],
                                line_by_line=True, dataloader_num_workers=0)
    tasks["mlm"]["hub_data"] = {"validation_file": str(standins / "text" / "validation.txt")}
    tasks["iia"]["args"].update(num_pairs=TINY["iia_pairs"], max_seq_length=TINY["max_seq_length"], n_bootstrap=200)
    tasks["iia"]["hub_data"] = {"file": str(standins / "text" / "validation.txt")}
    return Row(row.name, row.path, cfg, row.fingerprint)
