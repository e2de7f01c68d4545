"""What the extraction scripts share (scripts/extract.py, scripts/extract_distilbert.py; the causal-LM
quickstart uses `student_config`).

Which teacher blocks a student starts from (`--layers`, or the original's table for a 12-layer
teacher, or blocks spread evenly), checking the output path and the teacher, the student config cut
to the chosen blocks, and writing the student: a .pth state dict with its JSON record and config, or
a model folder.
"""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

from input_checks import check_config_numbers, check_local_path
from atomic_files import atomic_dir, atomic_open, atomic_write_text
from utils import check_output_parent, check_writable, CliError, logger

# The original's choice of blocks for a 12-layer teacher (DistilBERT paper: "one layer out of two",
# keeping the first and the last); the 9-entry table is the original's ablation with 9 layers.
TWELVE_LAYER_TABLE_UP_TO_6 = (0, 2, 4, 7, 9, 11)
TWELVE_LAYER_TABLE_UP_TO_9 = (0, 2, 3, 4, 7, 8, 9, 10, 11)
# A --dump_checkpoint with one of these endings is a state-dict file; any other name a model folder.
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin")


def default_teacher_layers(n_teacher: int, num_layers: int) -> tuple[list[int], str]:
    """The teacher blocks a `num_layers`-block student starts from, and how they were chosen.

    Returns (sorted block indices, "table" or "spread"). Assumes 1 <= num_layers <= n_teacher.
    """
    if n_teacher == 12 and num_layers <= 6:
        return list(TWELVE_LAYER_TABLE_UP_TO_6[:num_layers]), "table"
    if n_teacher == 12 and num_layers <= 9:
        return list(TWELVE_LAYER_TABLE_UP_TO_9[:num_layers]), "table"
    if num_layers == 1:
        return [0], "spread"
    # Evenly spaced from the first to the last block, rounded half up; the step is >= 1, so the
    # indices are strictly increasing.
    step = (n_teacher - 1) / (num_layers - 1)
    return [int(i * step + 0.5) for i in range(num_layers)], "spread"


def choose_teacher_layers(n_teacher: int, num_layers: int | None, layers: str | None) -> tuple[list[int], str]:
    """Validate `--num_layers` / `--layers` against a teacher of `n_teacher` blocks.

    Returns (teacher block indices in student order, how they were chosen). Raises CliError naming
    the flag at fault.
    """
    if layers is not None:
        try:
            chosen = [int(x) for x in layers.split(",")]
        except ValueError:
            raise CliError(f"--layers {layers!r}: expected comma-separated block indices, e.g. 0,2,4") from None
        bad = [i for i in chosen if not 0 <= i < n_teacher]
        if bad:
            raise CliError(
                f"--layers {layers}: block {bad[0]} is out of range for a {n_teacher}-layer teacher "
                f"(valid: 0..{n_teacher - 1})"
            )
        if any(b <= a for a, b in zip(chosen, chosen[1:])):
            raise CliError(f"--layers {layers}: indices must be strictly increasing (the student keeps the teacher's order)")
        if num_layers is not None and num_layers != len(chosen):
            raise CliError(f"--num_layers {num_layers} disagrees with --layers {layers} ({len(chosen)} blocks); give one of them")
        return chosen, "--layers"
    num_layers = 6 if num_layers is None else num_layers
    if not 1 <= num_layers <= n_teacher:
        raise CliError(f"--num_layers {num_layers}: must be between 1 and the teacher's depth ({n_teacher})")
    return default_teacher_layers(n_teacher, num_layers)


def check_dump_checkpoint(dump_checkpoint: str) -> Path:
    """Refuse, before any work is done, an output path that would overwrite something else.

    A `.pth`/`.pt` name must not be a folder; a folder name must not be a file, nor a folder holding
    anything but an earlier extraction (extraction.json), which is replaced.
    """
    path = Path(dump_checkpoint)
    check_writable(check_output_parent(path, "--dump_checkpoint", is_file=False), "--dump_checkpoint")
    if path.suffix in STATE_DICT_SUFFIXES:
        if path.is_dir():
            raise CliError(f"--dump_checkpoint {path} is a folder; give the path of a .pth file (or a folder name "
                           f"without .pth for a model folder)")
    elif path.is_file():
        raise CliError(f"--dump_checkpoint {path} is a file; give a .pth name or a new folder name")
    elif path.is_dir() and any(path.iterdir()) and not (path / "extraction.json").is_file():
        raise CliError(f"--dump_checkpoint {path} is a folder holding other files; give a new folder name or a .pth name")
    return path


def load_teacher_config(model_name: str, model_types: tuple[str, ...], flag_type: str):
    """The config of `model_name` (hub name or local folder), checked to be one of `model_types`.

    Read before the weights so that a wrong model or a bad layer choice fails fast. Raises
    CliError naming `--model_name`.
    """
    import transformers

    check_local_path(model_name, "--model_name")
    try:
        config = transformers.AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as err:
        raise CliError(f"--model_name {model_name}: cannot load its config ({err})") from None
    check_config_numbers(config, f"--model_name {model_name}")  # (the student's config is made from it)
    if config.model_type not in model_types:
        raise CliError(
            f"--model_name {model_name} is a {config.model_type!r} model; --model_type {flag_type} needs "
            f"a model of type {' or '.join(repr(t) for t in model_types)}"
        )
    return config


def load_teacher(model_name: str, model_class: str):
    """Load `model_name` as `transformers.<model_class>` in eval mode.

    Every weight of `model_class` must be in the checkpoint: a missing MLM head (a bare `BertModel`
    checkpoint, say) would otherwise be extracted as random numbers. Raises CliError naming
    `--model_name`.
    """
    import transformers

    try:
        model, info = getattr(transformers, model_class).from_pretrained(model_name, output_loading_info=True)
    except Exception as err:  # noqa: BLE001 -- OSError, a truncated or corrupt safetensors file: one message
        raise CliError(f"--model_name {model_name}: cannot load it as {model_class} (missing, truncated or "
                       f"corrupt weights?): {type(err).__name__}: {err}") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CliError(
            f"--model_name {model_name}: the checkpoint lacks {len(missing)} weight(s) of {model_class} "
            f"({shown}); extraction would copy random values"
        )
    return model.eval()


def save_extraction(state_dict: dict, dump_checkpoint: Path, record: dict, student_config, model_class: str,
                    optional: tuple[str, ...] = ()) -> None:
    """Write the student: its weights, the matching config and `record` (which teacher blocks), each atomically.

    `dump_checkpoint` ending in .pth/.pt/.bin: the state dict there, `record` in `<dump_checkpoint>.json`
    and `student_config` in `<stem>.config.json`. Any other name: a model folder holding config.json,
    model.safetensors (through `transformers.<model_class>.save_pretrained`, so tied weights are
    stored once) and extraction.json. State-dict keys starting with one of `optional` may be missing
    (they keep the student's initialisation); any other mismatch is a bug and raises.
    """
    import torch
    import transformers

    model = getattr(transformers, model_class)(student_config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ())
    missing = [k for k in missing if not k.startswith(optional) and k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"extraction does not fit {model_class}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    record = {**record, "student_config": student_config.to_dict()}
    if dump_checkpoint.suffix in STATE_DICT_SUFFIXES:
        with atomic_open(dump_checkpoint, "wb") as fh:
            torch.save(state_dict, fh)
        config_file = dump_checkpoint.with_suffix(".config.json")
        atomic_write_text(config_file, student_config.to_json_string())
        sidecar = dump_checkpoint.with_name(dump_checkpoint.name + ".json")
        atomic_write_text(sidecar, json.dumps(record, indent=2) + "\n")
        logger.info("wrote %d tensors to %s, the student config to %s (--student_config) and the record to %s",
                    len(state_dict), dump_checkpoint, config_file, sidecar)
        return
    with atomic_dir(dump_checkpoint) as tmp:
        model.save_pretrained(tmp)
        atomic_write_text(tmp / "extraction.json", json.dumps(record, indent=2) + "\n")
    logger.info("wrote the student folder %s (config.json, model.safetensors, extraction.json): pass it as both "
                "--student_config and --student_pretrained_weights", dump_checkpoint)


def warn_head_left_random(model_type: str, keys: tuple[str, ...]) -> None:
    """Say loudly that the LM head's transform keeps the student's random initialisation."""
    logger.warning(
        "no --vocab_transform: the %s student's MLM-head transform (%s) stays randomly initialised, so its "
        "predictions start as noise until training; add --vocab_transform to copy the teacher's (the paper's setting)",
        model_type, ", ".join(k.rstrip(".") for k in keys),
    )


def log_choice(n_teacher: int, teacher_layers: list[int], how: str) -> None:
    """Log which teacher blocks the student starts from, saying so when the spread rule chose them."""
    if how == "spread":
        logger.info(
            "teacher has %d layers and the student %d: the 12-layer table does not apply, taking teacher blocks "
            "spread evenly: %s",
            n_teacher, len(teacher_layers), teacher_layers,
        )
    else:
        logger.info("student block i <- teacher block %s (chosen by %s)", teacher_layers, how)


def student_config(config, teacher_layers: list[int]):
    """The teacher's `config` cut to the chosen blocks: `num_hidden_layers` = their number, and every
    per-layer list of the config (a list as long as the teacher's depth: Qwen2's `layer_types`,
    SmolLM3's `no_rope_layers`) keeps the chosen blocks' entries, so each block keeps its attention
    kind and positions."""
    n_teacher = config.num_hidden_layers
    out = copy.deepcopy(config)
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == n_teacher and key != "architectures":
            setattr(out, key, [value[i] for i in teacher_layers])
    out.num_hidden_layers = len(teacher_layers)
    return out


def add_student_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags both extraction scripts take for the student: --dump_checkpoint, --num_layers, --layers."""
    parser.add_argument("--dump_checkpoint", required=True,
                        help="output: a .pth (or .pt, .bin) name (state dict, plus <name>.pth.json record and "
                             "<name>.config.json student config) or any other name for a model folder (config.json, "
                             "model.safetensors, extraction.json)")
    parser.add_argument("--num_layers", type=int, default=None, help="student depth (default 6)")
    parser.add_argument("--layers", default=None, help="comma-separated teacher blocks to copy, e.g. 0,2,4,7,9,11")
