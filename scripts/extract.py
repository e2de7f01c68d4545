"""Initialise a shallower RoBERTa, GPT-2 or Llama-layout student from some of its teacher's blocks.

The student has the teacher's architecture with fewer blocks: the teacher's embeddings, final
layer norm (GPT-2) and LM head are copied as they are, the chosen blocks are copied and renumbered
0..n-1. Output (see `extraction.save_extraction`): with a `--dump_checkpoint` ending in .pth, a torch state
dict with the student's key names (`RobertaForMaskedLM` or `GPT2LMHeadModel`), a JSON sidecar
`<dump_checkpoint>.json` recording which teacher blocks were taken, and the matching student config
`<stem>.config.json` (for causal_train.py --student_config); with any other name, a model folder
(config.json, model.safetensors, extraction.json) that causal_train.py takes as both
--student_config and --student_pretrained_weights and `AutoModelFor*.from_pretrained` loads.

Which blocks: `--layers 0,2,4` names them; otherwise `--num_layers n` (default 6) takes, for a
12-layer teacher and n <= 9, the first n of the original table ((0, 2, 4, 7, 9, 11) for n <= 6,
(0, 2, 3, 4, 7, 8, 9, 10, 11) for 7 to 9), and for any other teacher depth or n, n blocks spread
evenly from the first to the last.

Usage:
    python scripts/extract.py --model_type roberta --model_name roberta-base \
        --dump_checkpoint serialization_dir/roberta-base_6.pth --num_layers 6 --vocab_transform
    python scripts/extract.py --model_type gpt2 --model_name gpt2 \
        --dump_checkpoint serialization_dir/gpt2_6          # a model folder
    python scripts/extract.py --model_type qwen2 --model_name Qwen/Qwen2.5-0.5B \
        --dump_checkpoint serialization_dir/qwen2.5-0.5b_12.pth --num_layers 12

Llama-layout rows (llama, mistral, qwen2, qwen3, gemma, olmo2, smollm3) copy the embeddings
(`model.embed_tokens`), the chosen `model.layers`, the final norm (`model.norm`) and the head
(`lm_head`, tied or not). The student config is the teacher's with `num_hidden_layers` set to the
student's depth and every per-layer list (`layer_types`, `no_rope_layers`) cut to the chosen blocks.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from extraction import (add_student_arguments, check_dump_checkpoint, choose_teacher_layers, load_teacher,
                        load_teacher_config, log_choice, save_extraction, student_config, warn_head_left_random)
from utils import logger, run_cli


@dataclass(frozen=True)
class ExtractionFamily:
    """Where one model family keeps what extraction needs, by state-dict key prefix."""

    model_class: str  # the transformers class that loads teacher and student
    blocks: str  # prefix of the numbered transformer blocks
    head_transform: tuple[str, ...]  # LM-head transform copied only with --vocab_transform
    default_model: str


EXTRACTION_FAMILIES = {
    "roberta": ExtractionFamily("RobertaForMaskedLM", "roberta.encoder.layer", ("lm_head.dense.", "lm_head.layer_norm."), "roberta-base"),
    "gpt2": ExtractionFamily("GPT2LMHeadModel", "transformer.h", (), "gpt2"),
}
# The Llama-layout rows (the same rows as interventions.FAMILIES): default teachers on the hub.
LLAMA_LAYOUT_DEFAULTS = {
    "llama": ("LlamaForCausalLM", "HuggingFaceTB/SmolLM2-135M"),
    "mistral": ("MistralForCausalLM", "mistralai/Mistral-7B-v0.1"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen/Qwen2.5-0.5B"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen/Qwen3-0.6B-Base"),
    "gemma": ("GemmaForCausalLM", "google/gemma-2b"),
    "olmo2": ("Olmo2ForCausalLM", "allenai/OLMo-2-0425-1B"),
    "smollm3": ("SmolLM3ForCausalLM", "HuggingFaceTB/SmolLM3-3B-Base"),
}
for _type, (_class, _default) in LLAMA_LAYOUT_DEFAULTS.items():
    EXTRACTION_FAMILIES[_type] = ExtractionFamily(_class, "model.layers", (), _default)


def extract_same_family(teacher_sd: dict, family: ExtractionFamily, teacher_layers: list[int], vocab_transform: bool) -> dict:
    """The student state dict: every non-block tensor of the teacher, and the chosen blocks renumbered.

    The LM-head transform (`family.head_transform`) is left out unless `vocab_transform`.
    """
    renumber = {old: new for new, old in enumerate(teacher_layers)}
    block_prefix = family.blocks + "."
    student_sd = {}
    for key, tensor in teacher_sd.items():
        if key.startswith(block_prefix):
            index, rest = key[len(block_prefix):].split(".", 1)
            if int(index) in renumber:
                student_sd[f"{block_prefix}{renumber[int(index)]}.{rest}"] = tensor
        elif key.startswith(family.head_transform) and not vocab_transform:
            continue
        else:
            student_sd[key] = tensor
    return student_sd


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Extract some blocks of a RobertaForMaskedLM, GPT2LMHeadModel or Llama-layout *ForCausalLM "
        "(llama, mistral, qwen2, qwen3, gemma, olmo2, smollm3) to initialise a shallower student."
    )
    parser.add_argument("--model_type", default="roberta", choices=sorted(EXTRACTION_FAMILIES),
                        help="the teacher's family, which is also the student's (default: roberta)")
    parser.add_argument("--model_name", default=None, help="hub name or local folder (default per --model_type: "
                        "roberta-base, gpt2, HuggingFaceTB/SmolLM2-135M for llama, Qwen/Qwen2.5-0.5B for qwen2, ...)")
    add_student_arguments(parser)
    parser.add_argument(
        "--vocab_transform", action="store_true", help="also copy the MLM head's dense + layer norm (RoBERTa)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    family = EXTRACTION_FAMILIES[args.model_type]
    model_name = args.model_name or family.default_model
    dump_checkpoint = check_dump_checkpoint(args.dump_checkpoint)

    config = load_teacher_config(model_name, (args.model_type,), args.model_type)
    n_teacher = config.num_hidden_layers
    teacher_layers, how = choose_teacher_layers(n_teacher, args.num_layers, args.layers)
    log_choice(n_teacher, teacher_layers, how)
    teacher = load_teacher(model_name, family.model_class)
    if args.vocab_transform and not family.head_transform:
        logger.info("--vocab_transform: %s has no LM-head transform, nothing more to copy", args.model_type)
    if family.head_transform and not args.vocab_transform:
        warn_head_left_random(args.model_type, family.head_transform)

    student_sd = extract_same_family(teacher.state_dict(), family, teacher_layers, args.vocab_transform)
    record = {
        "teacher": model_name,
        "model_type": args.model_type,
        "student_class": family.model_class,
        "teacher_layers": teacher_layers,
        "num_layers": len(teacher_layers),
        "layer_choice": how,
        "vocab_transform": bool(args.vocab_transform and family.head_transform),
    }
    save_extraction(student_sd, dump_checkpoint, record, student_config(config, teacher_layers),
                    family.model_class, family.head_transform)


if __name__ == "__main__":
    run_cli(main)
