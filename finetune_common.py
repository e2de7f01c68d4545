"""What run_mlm.py, run_clm.py, run_glue.py, run_ner.py and run_qa.py share.

Argument parsing (HfArgumentParser over dataclasses), the model arguments, model/config/tokenizer
loading with a vocabulary check, local-or-hub data loading, column checks, checkpoint resumption,
the Trainer with its collators, training and the `*_results.json` files. For the two language
modelling scripts also: the text data arguments, text loading and building an LM (from a
checkpoint or from scratch), and perplexity. Every user mistake surfaces as a `utils.CliError`
naming the culprit; `utils.run_cli` turns it into one log line and exit status 2.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from transformers import HfArgumentParser, TrainingArguments

from input_checks import check_config_numbers, check_local_path, check_tokenizer
from atomic_files import atomic_write_text, writing_into
from devices import cpu_bf16_warning, set_seed
from utils import (check_output_parent, check_writable, CliError, line_mode_progress_bars_for_transformers,
                   require_file, write_error, write_error_message)

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


@dataclass
class LmModelArguments(ModelArguments):
    """Model arguments plus what training a language model from scratch needs (run_mlm.py, run_clm.py)."""

    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Train from scratch (no --model_name_or_path): the model type, e.g. bert or distilbert "
            "(run_mlm.py), llama, qwen2, mistral or gpt2 (run_clm.py). vocab_size and the special token ids are "
            "taken from the tokenizer."
        },
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "When training from scratch, comma-separated config settings, e.g. "
            '"num_hidden_layers=4,hidden_size=256,num_attention_heads=4,intermediate_size=1024".'
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


def start(arguments: Sequence[type], argv: Sequence[str] | None, doc: str,
          actions: Iterable[str] = ("do_train", "do_eval", "do_predict")) -> tuple:
    """The opening every script shares: parse `argv` into the `arguments` dataclasses (the first line
    of `doc` is --help's description), align the logging, require one of the --do_* `actions` and
    batch sizes >= 1, find the checkpoint to resume from (`resolve_checkpoint`) and seed.
    Returns (*parsed dataclasses, checkpoint or None)."""
    parsed = parse_args(arguments, argv, doc.splitlines()[0])
    training_args = parsed[-1]
    setup_logging(training_args)
    require_action(training_args, actions)
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, flag) < 1:
            raise CliError(f"--{flag} must be >= 1, not {getattr(training_args, flag)}")
    check_sample_caps(parsed)
    if training_args.do_train:
        check_training_length(training_args)
        for flag, ok, what in (("learning_rate", training_args.learning_rate > 0, "> 0"),
                               ("weight_decay", training_args.weight_decay >= 0, ">= 0"),
                               ("adam_epsilon", training_args.adam_epsilon > 0, "> 0"),
                               ("max_grad_norm", training_args.max_grad_norm >= 0, ">= 0")):
            value = getattr(training_args, flag)
            if value is not None and (not math.isfinite(value) or not ok):
                raise CliError(f"--{flag} must be a finite number {what}, not {value}")
    check_output_dir(training_args.output_dir)
    out = Path(training_args.output_dir).absolute()
    _RUN["missing"] = [p for p in (out, *out.parents) if not p.exists()]
    _RUN["output_dir"] = training_args.output_dir
    line_mode_progress_bars_for_transformers()  # in a log file, one line per refresh (no text run into log lines)
    checkpoint = resolve_checkpoint(training_args)
    set_seed(training_args.seed)
    return (*parsed, checkpoint)


def check_sample_caps(parsed) -> None:
    """Every --max_*_samples cap of the scripts' data arguments is unset or >= 1 (0 trained or evaluated on
    nothing and reported it as a result)."""
    for args in parsed:
        for name, value in vars(args).items():
            if name.startswith("max_") and name.endswith("_samples") and value is not None and value < 1:
                raise CliError(f"--{name} must be >= 1 (or left out: every row), not {value}")


def check_training_length(training_args) -> None:
    """A training run trains at least one step: --max_steps -1 (the epochs decide) or >= 1, and then a finite
    --num_train_epochs > 0 (-1 and -1 trained 0 steps and saved the untrained model)."""
    steps, epochs = training_args.max_steps, training_args.num_train_epochs
    if steps == 0 or steps < -1:
        raise CliError(f"--max_steps must be -1 (train for --num_train_epochs) or >= 1, not {steps}")
    if steps == -1 and not (math.isfinite(epochs) and epochs > 0):
        raise CliError(f"--num_train_epochs must be a finite number > 0 when --max_steps is -1, not {epochs}: "
                       f"the run would train no step")


# What `start` saw of --output_dir: the folders the run is about to create (for `finetune_main` to remove again).
_RUN: dict = {}


def finetune_main(main):
    """Decorate a script's `main`: a run that fails removes the --output_dir folders it created and left empty, and
    a full disk or a refused write becomes one message naming --output_dir (no traceback)."""
    import functools

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        _RUN.clear()
        try:
            return main(*args, **kwargs)
        except BaseException as err:
            for made in _RUN.get("missing", ()):  # deepest first
                with contextlib.suppress(OSError):
                    made.rmdir()
            found = None if isinstance(err, CliError) else write_error(err)
            if found is not None:
                raise CliError(f"--output_dir {_RUN.get('output_dir')}: {write_error_message(found)}") from err
            raise

    return wrapped


def check_output_dir(output_dir: str) -> Path:
    """CliError naming --output_dir when it is a file, lies under a file, or cannot be written."""
    path = check_output_parent(output_dir, "--output_dir", is_file=False)
    return check_writable(path, "--output_dir")


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


def trainer_checkpoint_problem(path: Path, world_size: int = 1) -> str | None:
    """Why `path` cannot be resumed from exactly, or None when it is a complete Trainer checkpoint.

    The Trainer writes no manifest and its saves are not atomic; `trainer_state.json` is written last.
    A checkpoint is complete when that file parses and every file a continuation loads is there and
    whole: the weights (a safetensors file as long as its header says), `optimizer.pt`, `scheduler.pt`
    and the RNG state of every process (`rng_state.pth`, or `rng_state_<rank>.pth` under torchrun),
    each a zip whose members pass their CRC and which `torch.load(weights_only=True)` would take
    (tensors, plain data and NumPy arrays: no other global). Without the optimizer or RNG state the
    Trainer would resume silently into a different run; a crafted file would be refused by torch, with
    a traceback. A bit flipped inside the weights of a safetensors file is not detected (no checksum).
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
    if (path / "model.safetensors").is_file():
        problem = safetensors_problem(path / "model.safetensors")
        if problem:
            return f"model.safetensors {problem}"
    rng = ["rng_state.pth"] if world_size <= 1 else [f"rng_state_{rank}.pth" for rank in range(world_size)]
    for name, what in (("optimizer.pt", "the optimiser's state (Adam's moments)"), ("scheduler.pt", "the schedule"),
                       *((r, "the random generators (dropout, data order)") for r in rng)):
        if not (path / name).is_file():
            return (f"no {name}: a resume would silently restart {what} and train differently (a save interrupted, "
                    f"the file removed, or --save_only_model)")
    for file in sorted(path.glob("*.pt")) + sorted(path.glob("*.pth")) + sorted(path.glob("pytorch_model*.bin")):
        problem = torch_file_problem(file)
        if problem:
            return f"{file.name} {problem}"
    return None


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is not whole (its header unreadable, its size not the header's), or None."""
    import struct

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size:
                return "is truncated or corrupt (its header length exceeds the file)"
            header = json.loads(fh.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, AttributeError):
        return "is truncated or corrupt (unreadable header)"
    if size != 8 + n + end:
        return f"is truncated or corrupt ({size} bytes, its header says {8 + n + end})"
    return None


# Globals a Trainer's RNG state holds (NumPy's generator state), which transformers allows when it loads one.
_NUMPY_GLOBALS = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray",
                  "numpy.dtype", "numpy.dtypes.")


def torch_file_problem(path: Path) -> str | None:
    """Why a torch.save file is not whole or not plain data (a truncated zip, a member failing its CRC, a global
    that weights-only loading refuses), or None. Reads the whole file; builds nothing."""
    import zipfile

    import torch

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"is corrupt ({bad} fails its CRC check)"
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001 -- BadZipFile, a truncated archive, an unreadable pickle
        return f"is truncated or corrupt ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    refused = [g for g in unsafe if not g.startswith(_NUMPY_GLOBALS)]
    if refused:
        return (f"holds {', '.join(refused[:3])}, which weights-only loading refuses (a crafted file?): it is never "
                f"loaded")
    return None


def newest_complete_checkpoint(output_dir: Path, world_size: int = 1) -> str | None:
    """The complete `checkpoint-*` folder of `output_dir` with the highest step; logs each newer incomplete one skipped."""
    found = sorted(
        (step, p) for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and (step := checkpoint_step(p)) is not None
    )
    for _, path in reversed(found):
        problem = trainer_checkpoint_problem(path, world_size)
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
            last = newest_complete_checkpoint(output_dir, training_args.world_size) if output_dir.is_dir() else None
            if last is None:
                raise CliError(f"--resume_from_checkpoint {resume}: no complete checkpoint-* folder in {output_dir}")
            _log_resume(last, f"the newest complete checkpoint in {output_dir} (--resume_from_checkpoint {resume})",
                        training_args)
            return last
        path = require_file(resume, "--resume_from_checkpoint")
        problem = trainer_checkpoint_problem(path, training_args.world_size)
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
        last = newest_complete_checkpoint(output_dir, training_args.world_size)
        cont = f"it (from {last})" if last else "it (no complete checkpoint-* folder is left to continue from)"
        raise CliError(
            f"--output_dir {output_dir} holds a finished training run ({finished[0]}): pass --overwrite_output_dir "
            f"to train afresh, another --output_dir, or --resume_from_checkpoint latest to continue {cont} "
            f"(with a larger --max_steps or --num_train_epochs); to evaluate its model only, drop --do_train and "
            f"pass --model_name_or_path {output_dir} --do_eval"
        )
    last = newest_complete_checkpoint(output_dir, training_args.world_size)
    if last is not None:
        _log_resume(last, "a checkpoint was found in --output_dir; pass --overwrite_output_dir to train afresh",
                    training_args)
    return last


# ------------------------------------------------------------------------------ models, tokenizers


def _name_and_flag(model_args: ModelArguments, own: str) -> tuple[str | None, str]:
    """(--<own> if given, else --model_name_or_path; the flag it came from), the local path checked."""
    name = getattr(model_args, own) or model_args.model_name_or_path
    flag = f"--{own}" if getattr(model_args, own) else "--model_name_or_path"
    if name:
        check_local_path(name, flag)
    return name, flag


def load_tokenizer(model_args: ModelArguments, **kwargs):
    """AutoTokenizer from --tokenizer_name, else --model_name_or_path; CliError if it cannot be loaded."""
    from transformers import AutoTokenizer

    name, flag = _name_and_flag(model_args, "tokenizer_name")
    if not name:
        raise CliError("no tokenizer: pass --tokenizer_name (or a --model_name_or_path folder holding one)")
    try:
        return AutoTokenizer.from_pretrained(name, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                             **kwargs)
    except (OSError, ValueError, TypeError) as err:
        hint = "" if model_args.tokenizer_name else " (a student folder holds no tokenizer: pass --tokenizer_name)"
        raise CliError(f"could not load a tokenizer from {flag} {name}{hint}: {err}") from None


def load_config(model_args: ModelArguments, **overrides):
    """AutoConfig from --config_name, else --model_name_or_path, with `overrides` applied."""
    from transformers import AutoConfig

    name, flag = _name_and_flag(model_args, "config_name")
    if not name:
        raise CliError("no model: pass --model_name_or_path")
    try:
        config = AutoConfig.from_pretrained(name, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
                                            **overrides)
    except (OSError, ValueError, KeyError) as err:
        raise CliError(f"could not load a model config from {flag} {name}: {err}") from None
    check_config_numbers(config, f"{flag} {name}")
    return config


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


def resolve_max_length(requested: int | None, tokenizer, config, default: int = 512,
                       flag: str = "--max_seq_length") -> int:
    """The sequence length to use: `requested` (or `default`), capped by the tokenizer and the position table;
    errors and warnings name `flag` (run_clm.py's is --block_size)."""
    limits = [tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)]
    limits = [int(x) for x in limits if x is not None and x < 1_000_000]
    cap = min(limits) if limits else None
    if requested is None:
        return min([default] + ([cap] if cap else []))
    if requested <= 0:
        raise CliError(f"{flag} must be positive, got {requested}")
    if cap is not None and requested > cap:
        logger.warning("%s %d exceeds what the model handles (%d): using %d", flag, requested, cap, cap)
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


def used_splits(raw, training_args: TrainingArguments) -> list[str]:
    """The splits the --do_* flags ask for (train, validation, test), in that order; CliError naming the
    data file a flag needs when its split is missing."""
    actions = (("train", "do_train"), ("validation", "do_eval"), ("test", "do_predict"))
    for split, action in actions:
        if getattr(training_args, action) and split not in raw:
            raise CliError(f"--{action} needs {split} data: pass --{split}_file")
    return [split for split, action in actions if getattr(training_args, action)]


def load_split_files(data_args, training_args: TrainingArguments, cache_dir: str | None, file_loader=None):
    """The train/validation/test splits of --train_file/--validation_file/--test_file, else of --dataset_name
    (see `load_raw_datasets`). Returns (splits, sources, the splits the --do_* flags use: `used_splits`)."""
    raw, sources = load_raw_datasets(
        data_files={"train": data_args.train_file, "validation": data_args.validation_file, "test": data_args.test_file},
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        cache_dir=cache_dir,
        file_loader=file_loader,
    )
    return raw, sources, used_splits(raw, training_args)


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


def make_trainer(model, training_args: TrainingArguments, tokenizer, collator, *, train_dataset=None,
                 eval_dataset=None, compute_metrics=None):
    """HF's Trainer over these parts (`processing_class` is the tokenizer)."""
    from transformers import Trainer

    return Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=compute_metrics,
    )


def pad_multiple(training_args: TrainingArguments) -> int | None:
    """Pad batches to a multiple of 8 under fp16/bf16 (tensor-core friendly shapes), else not at all."""
    return 8 if training_args.fp16 or training_args.bf16 else None


def padding_collator(tokenizer, training_args: TrainingArguments, pad_to_max_length: bool):
    """The collator of inputs already padded to --max_seq_length, or one that pads each batch."""
    from transformers import DataCollatorWithPadding, default_data_collator

    if pad_to_max_length:
        return default_data_collator
    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_multiple(training_args))


def train_and_save(trainer, checkpoint: str | None, train_dataset) -> dict:
    """With --do_train: train (resuming from `checkpoint`), save the model, tokenizer and trainer state and
    write train_results.json; returns the training metrics ({} without --do_train)."""
    if not trainer.args.do_train:
        return {}
    with writing_into(trainer.args.output_dir, "--output_dir"):  # a full disk: one message naming the folder
        result = trainer.train(resume_from_checkpoint=checkpoint)
        save_model_atomically(trainer)
        metrics = dict(result.metrics)
        metrics["train_samples"] = len(train_dataset)
        save_metrics(trainer.args.output_dir, "train", metrics, trainer.is_world_process_zero())
        trainer.save_state()
    return metrics


def save_model_atomically(trainer) -> None:
    """`trainer.save_model()` into a hidden folder of --output_dir, then each file renamed into place: a full disk
    or a kill never leaves a truncated model.safetensors under its final name."""
    import tempfile

    out = Path(trainer.args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".final.", suffix=".tmp", dir=out))
    try:
        trainer.save_model(str(tmp))
        if trainer.is_world_process_zero():
            for f in sorted(tmp.iterdir()):
                if f.is_file():
                    os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def after_training(training_args):
    """Evaluation after a training run: should it fail, the trained model is already saved in --output_dir, and
    the error says so and how to evaluate it without training again (a rerun with --do_train is refused)."""
    try:
        yield
    except Exception as err:
        if not training_args.do_train:
            raise
        logger.debug("evaluation failed", exc_info=True)
        what = str(err) if isinstance(err, CliError) else f"{type(err).__name__}: {err}"
        out = training_args.output_dir
        raise CliError(f"the training finished and its model is saved in {out}, but the evaluation failed: {what}. "
                       f"Nothing is lost: evaluate it with --model_name_or_path {out} --do_eval (without --do_train)"
                       ) from err


# ------------------------------------------------------------------- language modelling (run_mlm, run_clm)


@dataclass
class LmDataArguments:
    """Which text to train and evaluate on (what run_mlm.py and run_clm.py share)."""

    dataset_name: str | None = field(default=None, metadata={"help": "A hub dataset name, e.g. wikitext."})
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The hub dataset's configuration, e.g. wikitext-103-raw-v1."}
    )
    dataset_dir: str | None = field(
        default=None,
        metadata={
            "help": "A folder written by datasets' save_to_disk: a DatasetDict (train/validation/test splits; "
            "test stands in for a missing validation) or a single Dataset (used as the training data with "
            "--do_train, as the evaluation data otherwise)."
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "Training text: .txt (one text per line), .csv or .json."})
    validation_file: str | None = field(
        default=None, metadata={"help": "Evaluation text: .txt (one text per line), .csv or .json."}
    )
    text_column_name: str | None = field(
        default=None, metadata={"help": "The column holding the text (default: 'text', else the first column)."}
    )
    validation_split_percentage: int = field(
        default=5,
        metadata={"help": "Without a validation split, the percentage of the training data held out for evaluation."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training sequences (run_clm.py: blocks)."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N evaluation sequences (run_clm.py: blocks)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the cached tokenized datasets."})

    def __post_init__(self):
        if not 0 <= self.validation_split_percentage < 100:
            raise CliError(f"--validation_split_percentage must lie in [0, 100), got {self.validation_split_percentage}")


def load_text_datasets(data_args: LmDataArguments, training_args, cache_dir: str | None):
    """The raw train/validation splits, from --dataset_dir, local files or the hub; splits off validation if needed."""
    from datasets import Dataset, DatasetDict, load_from_disk

    if data_args.dataset_dir:
        path = require_file(data_args.dataset_dir, "--dataset_dir")
        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise CliError(f"--dataset_dir {path}: not a folder written by save_to_disk: {err}") from None
        if isinstance(loaded, Dataset):
            loaded = DatasetDict({"train" if training_args.do_train else "validation": loaded})
        raw = DatasetDict(loaded)
        if "validation" not in raw and "test" in raw:
            raw["validation"] = raw["test"]
        sources = {split: f"{path} (split {split})" for split in raw}
    else:
        raw, sources = load_raw_datasets(
            data_files={"train": data_args.train_file, "validation": data_args.validation_file},
            dataset_name=data_args.dataset_name,
            dataset_config_name=data_args.dataset_config_name,
            cache_dir=cache_dir,
        )
    if "validation" not in raw and training_args.do_eval:
        if "train" not in raw:
            raise CliError("--do_eval needs evaluation data: pass --validation_file")
        train = raw["train"]
        n_val = len(train) * data_args.validation_split_percentage // 100
        if n_val == 0:
            raise CliError(
                f"no validation data: pass --validation_file, or a --validation_split_percentage that keeps at "
                f"least one of the {len(train)} training rows"
            )
        logger.info("holding out the first %d of %d training rows for evaluation", n_val, len(train))
        raw["validation"] = train.select(range(n_val))
        raw["train"] = train.select(range(n_val, len(train)))
        sources["validation"] = f"the first {data_args.validation_split_percentage}% of {sources['train']}"
    if training_args.do_train and "train" not in raw:
        raise CliError("--do_train needs training data: pass --train_file, --dataset_name or --dataset_dir")
    return raw, sources


def text_column(raw, data_args: LmDataArguments) -> str:
    """--text_column_name, else 'text', else the first column; CliError if a split lacks it."""
    first = raw[next(iter(raw))]
    column = data_args.text_column_name or ("text" if "text" in first.column_names else first.column_names[0])
    for split, ds in raw.items():
        if column not in ds.column_names:
            raise CliError(f"the {split} data lacks the text column {column!r} (it has: {', '.join(ds.column_names)})")
    return column


# How each kind of LM is built from scratch: its auto class, the model types an error suggests, and
# the tokenizer's special ids copied into the fresh config.
LM_KINDS = {
    "masked": dict(auto_class="AutoModelForMaskedLM", examples="bert, distilbert, roberta",
                   token_ids=("pad_token_id",)),
    "causal": dict(auto_class="AutoModelForCausalLM", examples="llama, qwen2, mistral, gpt2",
                   token_ids=("pad_token_id", "bos_token_id", "eos_token_id")),
}


def build_lm(model_args: LmModelArguments, tokenizer, kind: str):
    """(config, model) of a `kind` ("masked" or "causal") LM: from --model_name_or_path, or fresh from
    --model_type/--config_name (+ --config_overrides) with the tokenizer's vocabulary size and special ids."""
    import transformers
    from transformers import CONFIG_MAPPING

    auto_class = getattr(transformers, LM_KINDS[kind]["auto_class"])
    from_scratch = not model_args.model_name_or_path
    if model_args.config_overrides and not from_scratch:
        raise CliError("--config_overrides only applies when training from scratch (without --model_name_or_path)")
    if model_args.model_name_or_path or model_args.config_name:
        config = load_config(model_args)
    elif model_args.model_type:
        if model_args.model_type not in CONFIG_MAPPING:
            raise CliError(f"unknown --model_type {model_args.model_type!r}; e.g. {LM_KINDS[kind]['examples']}")
        config = CONFIG_MAPPING[model_args.model_type]()
    else:
        raise CliError("pass --model_name_or_path, or --model_type (with --tokenizer_name) to train from scratch")
    if from_scratch:
        if model_args.config_overrides:
            try:
                config.update_from_string(model_args.config_overrides)
            except (ValueError, TypeError) as err:  # unknown key, malformed value, or a key whose default is None
                raise CliError(f"--config_overrides {model_args.config_overrides!r}: {err}") from None
            check_config_numbers(config, f"--config_overrides {model_args.config_overrides!r}")
        config.vocab_size = len(tokenizer)
        for key in LM_KINDS[kind]["token_ids"]:
            value = getattr(tokenizer, key, None)
            if value is not None:
                setattr(config, key, value)
        logger.info("training a new %s model from scratch: %s", config.model_type, config.to_json_string())
    check_vocab(tokenizer, config, model_args)
    if not from_scratch:
        return config, load_model(auto_class, model_args, config)
    try:
        return config, auto_class.from_config(config)
    except ValueError as err:
        raise CliError(f"--model_type {config.model_type}: not a {kind} LM ({err})") from None


def load_lm_and_text(model_args: LmModelArguments, data_args: LmDataArguments, training_args, kind: str,
                      length: int | None, default_length: int, length_flag: str = "--max_seq_length"):
    """The opening of run_mlm.py and run_clm.py: (raw text splits, tokenizer, config, model, sequence length),
    the length being `length` (or `default_length`) capped by what the model and tokenizer handle. The raw
    splits carry `sources` (split -> the file or dataset it came from) for error messages."""
    raw, sources = load_text_datasets(data_args, training_args, model_args.cache_dir)
    raw.sources = sources
    tokenizer = load_tokenizer(model_args)
    config, model = build_lm(model_args, tokenizer, kind)
    if not model_args.model_name_or_path and not training_args.do_train:
        logger.warning("evaluating a freshly initialised model that was not trained")
    return raw, tokenizer, config, model, resolve_max_length(length, tokenizer, config, default=default_length,
                                                             flag=length_flag)


def evaluate_perplexity(trainer, eval_dataset, **extra) -> dict:
    """Evaluate, add `eval_samples`, `extra` and `perplexity` (exp of the eval loss) and write eval_results.json."""
    metrics = trainer.evaluate()
    metrics["eval_samples"] = len(eval_dataset)
    metrics.update(extra)
    try:
        perplexity = math.exp(metrics["eval_loss"])
    except OverflowError:
        perplexity = float("inf")
    metrics["perplexity"] = perplexity
    save_metrics(trainer.args.output_dir, "eval", metrics, trainer.is_world_process_zero())
    return metrics
