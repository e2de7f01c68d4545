"""Initialise a DistilBERT student from some blocks of a BERT teacher.

Copies the teacher's word and position embeddings and embedding LayerNorm, the chosen blocks
(renumbered 0..n-1) and the MLM head (`vocab_projector` <- the decoder weight and bias; with
`--vocab_transform` also `vocab_transform` / `vocab_layer_norm` <- the head's dense + LayerNorm).
The output (as in `extract.py`; see `extraction.save_extraction`): with a `--dump_checkpoint` ending in .pth, a torch state dict with
`DistilBertForMaskedLM` key names, a JSON sidecar `<dump_checkpoint>.json` recording the teacher
blocks taken, and the matching `DistilBertConfig` in `<stem>.config.json`; with any other name, a
model folder (config.json, model.safetensors, extraction.json) for causal_train.py's
--student_config and --student_pretrained_weights. Block choice is as in `extract.py` (`--layers`,
or the original's table for a 12-layer teacher, or blocks spread evenly).

Unlike the original, BERT's token-type embeddings are not simply dropped: DistilBERT has none,
and BERT adds row 0 of them to every token of a single-segment input, so that row is added into
every row of the student's position embeddings. A student extracted with all the teacher's
blocks then computes exactly what the teacher computes when token_type_ids are all zero.

Usage:
    python scripts/extract_distilbert.py --model_type bert --model_name bert-base-uncased \
        --dump_checkpoint serialization_dir/bert-base-uncased_0247911.pth --vocab_transform
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from extraction import (add_student_arguments, check_dump_checkpoint, choose_teacher_layers, load_teacher,
                        load_teacher_config, log_choice, save_extraction, warn_head_left_random)
from utils import CliError, logger, run_cli

if TYPE_CHECKING:
    import torch

# DistilBERT block module <- BERT block module (each has .weight and .bias).
BLOCK_MAP = (
    ("attention.q_lin", "attention.self.query"),
    ("attention.k_lin", "attention.self.key"),
    ("attention.v_lin", "attention.self.value"),
    ("attention.out_lin", "attention.output.dense"),
    ("sa_layer_norm", "attention.output.LayerNorm"),
    ("ffn.lin1", "intermediate.dense"),
    ("ffn.lin2", "output.dense"),
    ("output_layer_norm", "output.LayerNorm"),
)
HEAD_TRANSFORM_MAP = (
    ("vocab_transform", "cls.predictions.transform.dense"),
    ("vocab_layer_norm", "cls.predictions.transform.LayerNorm"),
)
DISTILBERT_LAYER_NORM_EPS = 1e-12  # fixed in DistilBERT's code, not configurable


def fold_token_type(position: torch.Tensor, token_type: torch.Tensor) -> torch.Tensor:
    """`position` with `token_type[0]` added to every row, computed in float32, in `position`'s dtype."""
    return (position.float() + token_type[0].float()).to(position.dtype)


def bert_to_distilbert(teacher_sd: dict, teacher_layers: list[int], vocab_transform: bool) -> dict:
    """Map a `BertForMaskedLM` state dict onto `DistilBertForMaskedLM` key names.

    Student block i takes teacher block `teacher_layers[i]`; token-type row 0 is folded into the
    position embeddings; the MLM-head transform is copied only with `vocab_transform`.
    """
    sd = {
        "distilbert.embeddings.word_embeddings.weight": teacher_sd["bert.embeddings.word_embeddings.weight"],
        "distilbert.embeddings.position_embeddings.weight": fold_token_type(
            teacher_sd["bert.embeddings.position_embeddings.weight"],
            teacher_sd["bert.embeddings.token_type_embeddings.weight"],
        ),
    }
    for w in ("weight", "bias"):
        sd[f"distilbert.embeddings.LayerNorm.{w}"] = teacher_sd[f"bert.embeddings.LayerNorm.{w}"]
    for student_idx, teacher_idx in enumerate(teacher_layers):
        for student_name, teacher_name in BLOCK_MAP:
            for w in ("weight", "bias"):
                sd[f"distilbert.transformer.layer.{student_idx}.{student_name}.{w}"] = teacher_sd[
                    f"bert.encoder.layer.{teacher_idx}.{teacher_name}.{w}"
                ]
    sd["vocab_projector.weight"] = teacher_sd["cls.predictions.decoder.weight"]
    sd["vocab_projector.bias"] = teacher_sd["cls.predictions.bias"]
    if vocab_transform:
        for student_name, teacher_name in HEAD_TRANSFORM_MAP:
            for w in ("weight", "bias"):
                sd[f"{student_name}.{w}"] = teacher_sd[f"{teacher_name}.{w}"]
    return sd


def distilbert_config_fields(teacher_config, num_layers: int) -> dict:
    """The `DistilBertConfig` fields matching the extracted weights of a BERT teacher."""
    return {
        "model_type": "distilbert",
        "vocab_size": teacher_config.vocab_size,
        "max_position_embeddings": teacher_config.max_position_embeddings,
        "dim": teacher_config.hidden_size,
        "n_heads": teacher_config.num_attention_heads,
        "hidden_dim": teacher_config.intermediate_size,
        "n_layers": num_layers,
        "activation": teacher_config.hidden_act,
        "sinusoidal_pos_embds": False,
        "tie_word_embeddings": bool(getattr(teacher_config, "tie_word_embeddings", True)),
        "pad_token_id": teacher_config.pad_token_id,
    }


def check_bert_teacher(teacher_config, model_name: str) -> None:
    """Refuse what DistilBERT cannot represent; warn about what it represents only approximately."""
    position_type = getattr(teacher_config, "position_embedding_type", "absolute") or "absolute"
    if position_type != "absolute":
        raise CliError(
            f"--model_name {model_name} uses position_embedding_type={position_type!r}; DistilBERT has only absolute positions"
        )
    if abs(teacher_config.layer_norm_eps - DISTILBERT_LAYER_NORM_EPS) > 1e-15:
        logger.warning(
            "teacher layer_norm_eps=%g but DistilBERT's is fixed at %g: the student's outputs will differ slightly",
            teacher_config.layer_norm_eps, DISTILBERT_LAYER_NORM_EPS,
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Extract some blocks of a BertForMaskedLM to initialise a DistilBERT student.")
    parser.add_argument("--model_type", default="bert", choices=["bert"],
                        help="the teacher's family: bert only (kept for the original's command line; "
                             "scripts/extract.py handles roberta and gpt2)")
    parser.add_argument("--model_name", default="bert-base-uncased", help="hub name or local folder")
    add_student_arguments(parser)
    parser.add_argument("--vocab_transform", action="store_true", help="also copy the MLM head's dense + LayerNorm")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    dump_checkpoint = check_dump_checkpoint(args.dump_checkpoint)
    config = load_teacher_config(args.model_name, ("bert",), args.model_type)
    check_bert_teacher(config, args.model_name)
    n_teacher = config.num_hidden_layers
    teacher_layers, how = choose_teacher_layers(n_teacher, args.num_layers, args.layers)
    log_choice(n_teacher, teacher_layers, how)
    teacher = load_teacher(args.model_name, "BertForMaskedLM")

    teacher_sd = teacher.state_dict()
    student_sd = bert_to_distilbert(teacher_sd, teacher_layers, args.vocab_transform)
    logger.info(
        "token_type_embeddings[0] added into every position embedding (DistilBERT has no token types; "
        "the original dropped them): for token_type_ids == 0 the student's embeddings equal the teacher's"
    )
    tied = torch.equal(teacher_sd["cls.predictions.decoder.weight"], teacher_sd["bert.embeddings.word_embeddings.weight"])
    if not tied:
        logger.warning(
            "the teacher's MLM decoder is not tied to its word embeddings: build the student with "
            "tie_word_embeddings=false, or loading will overwrite one with the other"
        )
    if not args.vocab_transform:
        warn_head_left_random("distilbert", tuple(name for name, _ in HEAD_TRANSFORM_MAP))

    student_config = distilbert_config_fields(config, len(teacher_layers))
    student_config["tie_word_embeddings"] = tied
    record = {
        "teacher": args.model_name,
        "model_type": args.model_type,
        "student_class": "DistilBertForMaskedLM",
        "teacher_layers": teacher_layers,
        "num_layers": len(teacher_layers),
        "layer_choice": how,
        "vocab_transform": args.vocab_transform,
        "token_type_folded_into_position_embeddings": True,
        "student_config": student_config,
    }
    from transformers import DistilBertConfig

    fields = {k: v for k, v in student_config.items() if k != "model_type"}
    save_extraction(student_sd, dump_checkpoint, record, DistilBertConfig(**fields), "DistilBertForMaskedLM",
                    tuple(name + "." for name, _ in HEAD_TRANSFORM_MAP))


if __name__ == "__main__":
    run_cli(main)
