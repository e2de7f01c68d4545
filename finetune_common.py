"""What run_mlm.py, run_glue.py, run_ner.py and run_qa.py share.

Argument parsing (HfArgumentParser over dataclasses), the model arguments, model/config/tokenizer
loading with a vocabulary check, local-or-hub data loading, column checks, checkpoint resumption
and the `*_results.json` files. Every user mistake surfaces as a `utils.CliError` naming the
culprit; `utils.run_cli` turns it into one log line and exit status 2.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from transformers import HfArgumentParser, TrainingArguments

from input_checks import check_local_path, check_tokenizer
from utils import CliError, atomic_write_text, cpu_bf16_warning, require_file

logger = logging.getLogger("causal_distill.finetune")

# Legacy hub dataset names -> where the dataset lives now; tried after the name as given.
HUB_ALIASES = {
    "glue": "nyu-mll/glue",
    "squad": "rajpurkar/squad",
    "squad_v2": "rajpurkar/squad_v2",
    "conll2003": "eriktks/conll2003",
    "wikitext": "Salesforce/wikitext",
}
# File extension -> `datasets` packaged builder.
FILE_BUILDERS = {"txt": "text", "text": "text", "csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json"}


@dataclass
class ModelArguments:
    """Which model, config and tokenizer to fine-tune or evaluate."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The model to start from: a local save_pretrained folder (e.g. a student written by "
            "causal_train.py) or a hub name. Task heads missing from it are initialised fresh."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config name or path, if not the same as --model_name_or_path."}
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer name or path, if not the same as --model_name_or_path (needed for student "
            "folders, which hold no tokenizer)."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where to cache models and datasets downloaded from the hub."}
    )
    model_revision: str = field(
        default="main", metadata={"help": "The hub revision (branch, tag or commit) of the model to use."}
    )


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus `--overwrite_output_dir`, which transformers 5 dropped."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train afresh even if --output_dir holds checkpoint-* folders or a finished run (the old "
            "checkpoints and *_results.json are deleted). Without it, --do_train resumes from the newest complete "
            "checkpoint found there (logged as a warning), and refuses a folder whose run finished "
            "(train_results.json)."
        },
    )


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None, description: str):
    """Parse `argv` (default: sys.argv[1:]) into the dataclasses; a single `.json` argument is read as a file.

    Validation errors raised by the dataclasses (ValueError) become CliError.
    """
    parser = HfArgumentParser(tuple(dataclass_types), description=description)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) == 1 and argv[0].endswith(".json"):
            parsed = parser.parse_json_file(json_file=os.path.abspath(require_file(argv[0], "arguments file")))
        else:
            parsed = parser.parse_args_into_dataclasses(args=argv)
    except ValueError as err:
        raise CliError(f"bad arguments: {err}") from None
    for args in parsed:
        if isinstance(args, ModelArguments):  # before any data is read: a typo is reported at once
            check_local_path(args.model_name_or_path, "--model_name_or_path")
            check_local_path(args.config_name, "--config_name")
            check_local_path(args.tokenizer_name, "--tokenizer_name")
        if isinstance(args, TrainingArguments) and args.dataloader_pin_memory and args.device.type == "cpu":
            # Pinned memory only helps copies to an accelerator; on the CPU torch warns at every evaluation.
            args.dataloader_pin_memory = False
    return parsed


def setup_logging(training_args: TrainingArguments) -> None:
    """Align the verbosity of transformers and datasets with `--log_level` and log the run's device."""
    import datasets
    import transformers

    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.info(
        "device %s, n_gpu %d, distributed %s, bf16 %s, fp16 %s, seed %d",
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value,
        training_args.bf16,
        training_args.fp16,
        training_args.seed,
    )
    if training_args.bf16 and training_args.device.type == "cpu" and (warning := cpu_bf16_warning()):
        logger.warning("--bf16: %s", warning)


def require_action(training_args: TrainingArguments, allowed: Iterable[str] = ("do_train", "do_eval", "do_predict")) -> None:
    """Raise CliError unless at least one of the `allowed` --do_* flags is set."""
    allowed = list(allowed)
    if not any(getattr(training_args, name) for name in allowed):
        raise CliError("nothing to do: pass " + " and/or ".join(f"--{name}" for name in allowed))


# What a finished run leaves in --output_dir (written by `train_and_save` after the last step).
FINISHED_MARKERS = ("train_results.json",)


def checkpoint_step(path: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, None for any other name."""
    name = Path(path).name
    prefix = "checkpoint-"
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        return None
    return int(name[len(prefix):])


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be resumed from, or None when it is a complete Trainer checkpoint.

    The Trainer writes `trainer_state.json` last, after the weights, optimizer, scheduler and RNG
    states, and not atomically: a checkpoint is complete when that file parses and the weights exist.
    """
    path = Path(path)
    state = path / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save was interrupted)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "trainer_state.json is truncated or unreadable (the save was interrupted)"
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((path / w).is_file() for w in weights):
        return "no model weights"
    return None


def newest_complete_checkpoint(output_dir: Path) -> str | None:
    """The complete `checkpoint-*` folder of `output_dir` with the highest step; logs each newer incomplete one skipped."""
    found = sorted(
        (step, p) for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and (step := checkpoint_step(p)) is not None
    )
    for _, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("skipping the incomplete checkpoint %s: %s", path, problem)
    return None


def _log_resume(path: str, why: str, training_args: TrainingArguments) -> None:
    """A warning banner naming the checkpoint and its step; another warning if no step would be left to train."""
    state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    step = state.get("global_step")
    logger.warning("=" * 80)
    logger.warning("RESUMING training from %s (step %s): %s", path, step, why)
    logger.warning("=" * 80)
    target = training_args.max_steps if training_args.max_steps > 0 else state.get("max_steps")
    if isinstance(step, int) and isinstance(target, int) and target > 0 and step >= target:
        logger.warning(
            "%s already reached step %d of %d: no training step is left (train_loss will read 0.0); pass a larger "
            "--max_steps (or --num_train_epochs) to continue it", path, step, target,
        )


def resolve_checkpoint(training_args: FinetuneTrainingArguments) -> str | None:
    """The checkpoint folder to resume training from, or None to train from the start.

    `--resume_from_checkpoint PATH` resumes from PATH (an error if it is incomplete); `True`,
    `latest` or `last` mean the newest complete `checkpoint-*` folder in --output_dir. Without the
    flag, --do_train resumes from the newest complete checkpoint in --output_dir if there is one,
    unless --overwrite_output_dir (which deletes the old checkpoint folders and results so they do
    not mix with the new run's). Incomplete checkpoints (an interrupted save) are skipped, by name.
    A folder holding a finished run (train_results.json) is refused unless the flag is explicit or
    --overwrite_output_dir is given. Every resume is logged as a warning.
    """
    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is not None and str(resume).strip().lower() in ("false", "none", ""):
        resume = None
    if resume is not None:
        if str(resume).strip().lower() in ("true", "latest", "last"):
            last = newest_complete_checkpoint(output_dir) if output_dir.is_dir() else None
            if last is None:
                raise CliError(f"--resume_from_checkpoint {resume}: no complete checkpoint-* folder in {output_dir}")
            _log_resume(last, f"the newest complete checkpoint in {output_dir} (--resume_from_checkpoint {resume})",
                        training_args)
            return last
        path = require_file(resume, "--resume_from_checkpoint")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CliError(f"--resume_from_checkpoint {path}: not a complete Trainer checkpoint ({problem})")
        _log_resume(str(path), "--resume_from_checkpoint", training_args)
        return str(path)
    if not training_args.do_train or not output_dir.is_dir():
        return None
    if training_args.overwrite_output_dir:
        for old in sorted(output_dir.glob("checkpoint-*")):
            if old.is_dir():
                logger.info("--overwrite_output_dir: removing old checkpoint %s", old)
                shutil.rmtree(old)
        for name in ("train_results.json", "eval_results.json", "all_results.json", "trainer_state.json"):
            (output_dir / name).unlink(missing_ok=True)
        return None
    finished = [m for m in FINISHED_MARKERS if (output_dir / m).is_file()]
    if finished:
        raise CliError(
            f"--output_dir {output_dir} holds a finished training run ({finished[0]}): pass --overwrite_output_dir "
            f"to train afresh, another --output_dir, or --resume_from_checkpoint latest to continue it "
            f"(with a larger --max_steps or --num_train_epochs)"
        )
    last = newest_complete_checkpoint(output_dir)
    if last is not None:
        _log_resume(last, "a checkpoint was found in --output_dir; pass --overwrite_output_dir to train afresh",
                    training_args)
    return last


# ------------------------------------------------------------------------------ models, tokenizers


def load_tokenizer(model_args: ModelArguments, **kwargs):
    """AutoTokenizer from --tokenizer_name, else --model_name_or_path; CliError if it cannot be loaded."""
    from transformers import AutoTokenizer

    name = model_args.tokenizer_name or model_args.model_name_or_path
    if not name:
        raise CliError("no tokenizer: pass --tokenizer_name (or a --model_name_or_path folder holding one)")
    check_local_path(name, "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path")
    try:
        return AutoTokenizer.from_pretrained(
            name, cache_dir=model_args.cache_dir, revision=model_args.model_revision, **kwargs
        )
    except (OSError, ValueError, TypeError) as err:
        flag = "--tokenizer_name" if model_args.tokenizer_name else "--model_name_or_path"
        hint = "" if model_args.tokenizer_name else " (a student folder holds no tokenizer: pass --tokenizer_name)"
        raise CliError(f"could not load a tokenizer from {flag} {name}{hint}: {err}") from None


def load_config(model_args: ModelArguments, **overrides):
    """AutoConfig from --config_name, else --model_name_or_path, with `overrides` applied."""
    from transformers import AutoConfig

    name = model_args.config_name or model_args.model_name_or_path
    if not name:
        raise CliError("no model: pass --model_name_or_path")
    check_local_path(name, "--config_name" if model_args.config_name else "--model_name_or_path")
    try:
        return AutoConfig.from_pretrained(
            name, cache_dir=model_args.cache_dir, revision=model_args.model_revision, **overrides
        )
    except (OSError, ValueError, KeyError) as err:
        flag = "--config_name" if model_args.config_name else "--model_name_or_path"
        raise CliError(f"could not load a model config from {flag} {name}: {err}") from None


def check_vocab(tokenizer, config, model_args: ModelArguments) -> None:
    """CliError naming --tokenizer_name when the tokenizer is not the model's (see `input_checks.check_tokenizer`)."""
    check_tokenizer(
        tokenizer,
        config,
        tokenizer_flag="--tokenizer_name",
        tokenizer_name=model_args.tokenizer_name
        or f"(not given, so read from --model_name_or_path {model_args.model_name_or_path})",
        model_name=f"model {model_args.model_name_or_path or model_args.config_name or '(new, from scratch)'}",
    )


def load_model(auto_class, model_args: ModelArguments, config):
    """`auto_class.from_pretrained(--model_name_or_path, config=config)`; CliError if it fails to load."""
    check_local_path(model_args.model_name_or_path, "--model_name_or_path")
    try:
        return auto_class.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
        )
    except Exception as err:  # noqa: BLE001 -- OSError, ValueError, a truncated safetensors file: one message
        raise CliError(f"could not load model weights from --model_name_or_path {model_args.model_name_or_path} "
                       f"(missing, truncated or not a model of this kind?): {type(err).__name__}: {err}") from None


def resolve_max_length(requested: int | None, tokenizer, config, default: int = 512) -> int:
    """The sequence length to use: `requested` (or `default`), capped by the tokenizer and the position table."""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    limits = [int(x) for x in limits if x is not None and x < 1_000_000]
    cap = min(limits) if limits else None
    if requested is None:
        return min([default] + ([cap] if cap else []))
    if requested <= 0:
        raise CliError(f"--max_seq_length must be positive, got {requested}")
    if cap is not None and requested > cap:
        logger.warning("--max_seq_length %d exceeds what the model handles (%d): using %d", requested, cap, cap)
        return cap
    return requested


# -------------------------------------------------------------------------------------------- data


def _load_file(path: str, split: str, cache_dir: str | None):
    """One local csv/tsv/json/jsonl/txt file as a Dataset."""
    from datasets import load_dataset

    p = require_file(path, f"the {split} file")
    ext = p.name.rsplit(".", 1)[-1].lower() if "." in p.name else ""
    builder = FILE_BUILDERS.get(ext)
    if builder is None:
        raise CliError(f"{p}: unsupported file type {ext!r} (use one of {', '.join(sorted(FILE_BUILDERS))})")
    kwargs = {"delimiter": "\t"} if ext == "tsv" else {}
    try:
        return load_dataset(builder, data_files={split: str(p)}, split=split, cache_dir=cache_dir, **kwargs)
    except Exception as err:  # the datasets builders raise many types for a malformed file
        raise CliError(f"could not read {p} as {builder}: {err}") from None


def load_hub_dataset(names: Sequence[str], config_name: str | None, cache_dir: str | None):
    """`load_dataset(name, config_name)` for the first name in `names` that loads; CliError if none does."""
    from datasets import load_dataset

    errors = []
    for name in names:
        try:
            return load_dataset(name, config_name, cache_dir=cache_dir)
        except Exception as err:  # offline, unknown name, missing config: all reported the same way
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise CliError(
        f"could not load dataset {names[0]!r}"
        + (f" (config {config_name!r})" if config_name else "")
        + " from the hub ("
        + "; ".join(errors)
        + "). Without a network, pass local files with --train_file/--validation_file"
    )


def load_raw_datasets(
    *,
    data_files: dict[str, str | None],
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    hub_names: Sequence[str] | None = None,
    cache_dir: str | None = None,
    file_loader=None,
):
    """Load the splits from local files when any is given, else from the hub.

    Returns `(DatasetDict, sources)` where `sources[split]` names the file (or hub dataset) a
    split came from, for error messages. Local files may differ in format; each split is loaded
    on its own. `file_loader(path, split)` replaces the csv/json/text loader (e.g. SQuAD json).
    """
    from datasets import DatasetDict

    files = {split: path for split, path in data_files.items() if path}
    raw, sources = DatasetDict(), {}
    if files:
        for split, path in files.items():
            raw[split] = file_loader(path, split) if file_loader else _load_file(path, split, cache_dir)
            sources[split] = str(path)
        return raw, sources
    if not dataset_name:
        flags = ", ".join(f"--{split}_file" for split in data_files)
        raise CliError(f"no data: pass --dataset_name or local files ({flags})")
    names = list(hub_names or [dataset_name, HUB_ALIASES.get(dataset_name)])
    raw = load_hub_dataset([n for n in dict.fromkeys(names) if n], dataset_config_name, cache_dir)
    for split in raw:
        sources[split] = f"dataset {dataset_name}" + (f"/{dataset_config_name}" if dataset_config_name else "") + f" split {split}"
    return raw, sources


def check_columns(dataset, required: Iterable[str], source: str) -> None:
    """CliError naming `source` and the missing columns if `dataset` lacks any of `required`."""
    missing = [c for c in required if c not in dataset.column_names]
    if missing:
        raise CliError(
            f"{source} lacks the column(s) {', '.join(missing)} (it has: {', '.join(dataset.column_names)})"
        )


def take(dataset, n: int | None):
    """The first `n` rows of `dataset` (all when `n` is None)."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.select(range(n))


# ----------------------------------------------------------------------------------------- results


def save_metrics(output_dir: str | os.PathLike, split: str, metrics: dict, is_main: bool = True) -> None:
    """Write `<split>_results.json` and merge `metrics` into `all_results.json`, atomically, as HF's Trainer does."""
    logger.info("***** %s metrics *****", split)
    for key, value in sorted(metrics.items()):
        logger.info("  %s = %s", key, value)
    if not is_main:
        return
    out = Path(output_dir)
    atomic_write_text(out / f"{split}_results.json", json.dumps(metrics, indent=4, sort_keys=True))
    all_path = out / "all_results.json"
    combined = json.loads(all_path.read_text()) if all_path.is_file() else {}
    combined.update(metrics)
    atomic_write_text(all_path, json.dumps(combined, indent=4, sort_keys=True))


def train_and_save(trainer, checkpoint: str | None, n_train: int) -> dict:
    """Train (resuming from `checkpoint`), save the model, tokenizer and trainer state, write train_results.json."""
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model()
    metrics = dict(result.metrics)
    metrics["train_samples"] = n_train
    save_metrics(trainer.args.output_dir, "train", metrics, trainer.is_world_process_zero())
    trainer.save_state()
    return metrics

