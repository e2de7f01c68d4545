"""Write a neuron-mapping (.nm) file for any teacher and student: the original's alignments, by name.

The shipped training_configs/*.nm assume a 12-layer, 12-head, 64-dimension teacher (BERT-base).
This script writes the same alignments for the depths and widths of the models at hand, reading
both shapes from their configs. Every site is a block's whole hidden state (all heads, all
dimensions); teacher and student widths may differ.

Alignments (teacher depth T, student depth S; blocks are 0-based block outputs):
  extracted                    student block i -> the teacher block it was extracted from, one entry per
                               student block (read from the extraction record that scripts/extract*.py
                               write: <name>.pth.json beside a .pth, extraction.json in a student folder);
                               the quickstart's DIITO mapping
  single_middle (middle)       block T//2 -> block S//2          (single_middle_layer_6.nm: 6 -> 3)
  single_middle_late (late)    block T-2 -> block S-2            (single_middle_late.nm: 10 -> 1, S=3)
  multiple_single_middle_late  T-3 -> S-3 and T-2 -> S-2         (multiple_single_middle_late_layer_6.nm)
  multiple_single_multilayer (full)
                               the T blocks cut into S consecutive groups, group i -> block i, the
                               first T mod S groups one block longer (multiple_single_multilayer_layer_N.nm)

Example (after scripts/extract_distilbert.py --dump_checkpoint serialization_dir/student):
  python scripts/make_mapping.py --teacher bert-base-uncased --student serialization_dir/student \\
      --alignment single_middle --output serialization_dir/single_middle.nm
  python scripts/make_mapping.py --teacher bert-base-uncased --student serialization_dir/student \\
      --alignment extracted --output serialization_dir/extracted.nm
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence

from input_checks import check_local_path
from neuron_mapping import ModelShape, parse_variable_name
from atomic_files import atomic_write_text
from utils import check_output_parent, check_writable, CliError, logger, run_cli

# Alignment name -> function(teacher depth, student depth) -> [(teacher blocks, student block)].
ALIGNMENTS = {
    "single_middle": lambda t, s: [([t // 2], s // 2)],
    "single_middle_late": lambda t, s: [([max(t - 2, 0)], max(s - 2, 0))],
    "multiple_single_middle_late": lambda t, s: [([t - 3], s - 3), ([t - 2], s - 2)],
    "multiple_single_multilayer": lambda t, s: _groups(t, s),
}
ALIASES = {"middle": "single_middle", "late": "single_middle_late", "full": "multiple_single_multilayer"}
# Read from the extraction record rather than computed from the depths.
EXTRACTED = "extracted"


def extraction_record(student: str) -> tuple[Path, list[int]]:
    """(record file, teacher block of each student block) of an extracted student; CliError naming --student
    when there is no record or it does not say which teacher blocks were copied."""
    path = Path(student).expanduser()
    if path.is_dir():
        candidates = [path / "extraction.json"]
    elif path.name.endswith(".config.json"):  # X.config.json beside X.pth
        stem = path.name[: -len(".config.json")]
        candidates = [path.with_name(f"{stem}{suffix}.json") for suffix in (".pth", ".pt", ".bin")]
    else:
        candidates = [path.with_name(path.name + ".json")]
    record = next((c for c in candidates if c.is_file()), None)
    if record is None:
        raise CliError(f"--alignment {EXTRACTED} needs the extraction record of --student {student} "
                       f"({' or '.join(str(c) for c in candidates)}), which scripts/extract_distilbert.py and "
                       f"scripts/extract.py write: pass the student they wrote, or choose another --alignment")
    try:
        layers = json.loads(record.read_text(encoding="utf-8")).get("teacher_layers")
    except (OSError, ValueError, AttributeError) as err:
        raise CliError(f"--student {student}: cannot read its extraction record {record} ({err})") from None
    if not isinstance(layers, list) or not layers or not all(type(x) is int and x >= 0 for x in layers):
        raise CliError(f"--student {student}: its extraction record {record} lists no teacher_layers")
    return record, layers


def extracted_pairs(teacher_layers: list[int], n_teacher: int, n_student: int, record: Path) -> list:
    """Student block i -> teacher block teacher_layers[i]; CliError when the record does not fit the models."""
    if len(teacher_layers) != n_student:
        raise CliError(f"the extraction record {record} lists {len(teacher_layers)} teacher blocks but the student has "
                       f"{n_student}: not the record of this student")
    if max(teacher_layers) >= n_teacher:
        raise CliError(f"the extraction record {record} copies teacher block {max(teacher_layers)} but --teacher has "
                       f"{n_teacher} blocks: not the teacher this student was extracted from")
    return [([t], i) for i, t in enumerate(teacher_layers)]


def _groups(n_teacher: int, n_student: int) -> list[tuple[list[int], int]]:
    """The teacher's blocks in `n_student` consecutive groups, the first `n_teacher % n_student` one longer."""
    size, longer = divmod(n_teacher, n_student)
    out, start = [], 0
    for i in range(n_student):
        stop = start + size + (1 if i < longer else 0)
        out.append((list(range(start, stop)), i))
        start = stop
    return out


def alignment_pairs(name: str, n_teacher: int, n_student: int) -> list[tuple[list[int], int]]:
    """`[(teacher blocks, student block)]` of alignment `name` (or its alias); CliError if the depths do not allow it."""
    name = ALIASES.get(name, name)
    if name == "multiple_single_multilayer" and n_teacher < n_student:
        raise CliError(f"--alignment {name} needs a teacher at least as deep as the student ({n_teacher} < {n_student})")
    if name == "multiple_single_middle_late" and min(n_teacher, n_student) < 3:
        raise CliError(f"--alignment {name} needs 3 or more blocks in teacher and student ({n_teacher}, {n_student})")
    return ALIGNMENTS[name](n_teacher, n_student)


def variable_name(blocks: Sequence[int], shape: ModelShape) -> str:
    """`$L:..$H:[0:heads]$[0:head_dim]`: the whole hidden state of one block or of a run of consecutive blocks."""
    layers = str(blocks[0]) if len(blocks) == 1 else f"[{blocks[0]}:{blocks[-1] + 1}]"
    return f"$L:{layers}$H:[0:{shape.n_heads}]$[0:{shape.head_dim}]"


def build_mapping(name: str, teacher: ModelShape, student: ModelShape, pairs: list | None = None) -> dict:
    """The .nm content (a dict) of alignment `name` (or of the given `[(teacher blocks, student block)]` pairs)
    between models of these shapes, validated against them."""
    entries = []
    for teacher_blocks, student_block in pairs or alignment_pairs(name, teacher.n_layers, student.n_layers):
        entry = {
            "teacher_variable_names": [variable_name(teacher_blocks, teacher)],
            "student_variable_names": [variable_name([student_block], student)],
        }
        for side, shape in (("teacher", teacher), ("student", student)):
            for var in entry[f"{side}_variable_names"]:
                parse_variable_name(var, shape)  # raises ValueError if out of range: a bug here
        entries.append(entry)
    return {"interchange_variable_mappings": entries}


def load_shape(name: str, flag: str) -> ModelShape:
    """Depth, width and heads from a config: a config .json, a model folder, a hub name, or an extracted .pth.

    For `X.pth` the extract scripts' `X.config.json` beside it is read.
    """
    from transformers import AutoConfig

    check_local_path(name, flag)
    path = Path(name).expanduser()
    if path.suffix in (".pth", ".pt", ".bin") and path.with_suffix(".config.json").is_file():
        path = path.with_suffix(".config.json")
    try:
        if path.is_file():
            fields = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(fields, dict) or "model_type" not in fields:
                raise CliError(f"{flag} {name}: not a model config (a JSON object with a model_type)")
            config = AutoConfig.for_model(**fields)
        else:
            config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as err:
        raise CliError(f"{flag} {name}: cannot read a model config ({err})") from None
    try:
        shape = ModelShape(int(config.num_hidden_layers), int(config.hidden_size), int(config.num_attention_heads))
    except (AttributeError, TypeError) as err:
        raise CliError(f"{flag} {name}: the config lacks depth, width or heads ({err})") from None
    if shape.n_layers < 1 or shape.n_heads < 1 or shape.hidden_size % shape.n_heads:
        raise CliError(f"{flag} {name}: {shape.hidden_size} hidden dimensions do not split into {shape.n_heads} heads")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True,
                        help="The teacher: a model folder, a config .json, or a hub name (its config is read).")
    parser.add_argument("--student", required=True,
                        help="The student: a model folder (extract scripts' folder output), a config .json, or an "
                             "extracted .pth (its <name>.config.json is read).")
    parser.add_argument("--alignment", required=True, choices=[EXTRACTED] + sorted(ALIGNMENTS) + sorted(ALIASES),
                        help="Which alignment (see above); middle, late and full are short names; extracted reads "
                             "--student's extraction record.")
    parser.add_argument("--output", required=True, help="The .nm file to write (folders are created).")
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    if out.is_dir():
        raise CliError(f"--output {out} is a folder; give the path of a .nm file")
    check_writable(check_output_parent(out, "--output"), "--output")
    teacher = load_shape(args.teacher, "--teacher")
    student = load_shape(args.student, "--student")
    pairs = None
    if args.alignment == EXTRACTED:
        record, layers = extraction_record(args.student)
        pairs = extracted_pairs(layers, teacher.n_layers, student.n_layers, record)
    mapping = build_mapping(args.alignment, teacher, student, pairs)
    atomic_write_text(out, json.dumps(mapping, indent=4) + "\n")
    entries = mapping["interchange_variable_mappings"]
    pairs = "; ".join(f"{e['teacher_variable_names'][0]} -> {e['student_variable_names'][0]}" for e in entries)
    logger.info("wrote %s (%s, teacher %d blocks, student %d blocks): %s",
                out, ALIASES.get(args.alignment, args.alignment), teacher.n_layers, student.n_layers, pairs)
    return out


if __name__ == "__main__":
    run_cli(main)
