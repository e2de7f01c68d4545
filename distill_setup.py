"""The set-up of a distillation run: causal_train.py's command line and checks, and `build(args, runtime)`.

`build` loads and checks every input (tokenizer, teacher, student, neuron mapping, token counts,
corpus), makes the run's one `DistillConfig` and assembles the run: the models in place (the teacher
frozen), the dataset and the `CausalDistiller` with its optimiser. causal_train.py trains what it returns; count_step_flops.py
and the benchmark step it (`CausalDistiller.step`), so all three run the same build.
`build_from_models` is the second half alone, for models and data made in memory.
"""
from __future__ import annotations

import argparse
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from batching import add_interchange_args, interchange_problem, load_token_probs
from binarized_io import load_corpus, require_corpus, vocab_fingerprint
from causal_distiller import CausalDistiller
from devices import Runtime, cpu_bf16_warning, init_runtime, set_seed, tune_cpu_allocator
from distill_config import DistillConfig
from checkpoints import file_fingerprint, short_load_error
from input_checks import check_config_numbers, check_local_path, check_tokenizer
from interventions import CAUSAL_FAMILIES, FAMILIES, family_of, get_submodule, model_shape
from lm_seqs_dataset import LmSeqsDataset
from losses import DIVERGENCES, LOSS_NAMES, Divergence
from neuron_mapping import MappingEntry, load_neuron_mapping
from sharding import fsdp_flag_problem
from utils import CliError, logger, require_file

STUDENT_TYPES = ("distilbert", "roberta", *CAUSAL_FAMILIES)
TEACHER_TYPES = ("bert", "roberta", *CAUSAL_FAMILIES)


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """causal_train.py's command line (every flag with its help)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--force", action="store_true",
      help="Replace an existing --dump_path. Every input is checked first; the old contents are moved aside and "
           "deleted only once this run has written its first checkpoint (restored if it fails before).")
    a("--dump_path", required=True, help="Output folder: the student (HF model folder), checkpoints, logs.")
    a("--data_file", required=True,
      help="Binarized corpus (scripts/binarized_data.py output, either format: {dump_file}.{split}.{tokenizer}.bin, "
           "or .pickle with its --format pickle).")
    a("--student_type", choices=STUDENT_TYPES, required=True, help="Student architecture.")
    a("--student_config", required=True,
      help="Student config: a JSON file (see training_configs/, or the <name>.config.json that the extract scripts "
           "write beside a .pth) or a model folder holding config.json (an extract script's folder output).")
    a("--student_pretrained_weights", default=None,
      help="Initial student weights: a .pth state dict (scripts/extract_distilbert.py) or an HF model folder.")
    a("--teacher_type", choices=TEACHER_TYPES, required=True, help="Teacher architecture.")
    a("--teacher_name", required=True, help="Teacher: a hub name (bert-base-uncased) or a local HF model folder.")
    a("--tokenizer_name", default=None,
      help="Tokenizer giving the special token ids (default: --teacher_name).")
    a("--neuron_mapping", default=None, help="Neuron-mapping .nm file aligning teacher and student sites (DIITO).")
    a("--temperature", type=float, default=2.0, help="Softmax temperature of the soft-target losses.")
    a("--alpha_ce", type=float, default=0.5, help="Weight of the soft-target KL loss.")
    a("--alpha_mlm", type=float, default=0.0, help="Weight of the masked-LM loss (requires --mlm).")
    a("--alpha_clm", type=float, default=0.5, help="Weight of the causal-LM loss (without --mlm).")
    a("--alpha_mse", type=float, default=0.0, help="Weight of the MSE between student and teacher logits.")
    a("--alpha_cos", type=float, default=0.0, help="Weight of the cosine loss between last hidden states.")
    a("--alpha_causal_ce", type=float, default=0.0, help="Weight of the DIITO soft-target loss on counterfactual runs.")
    a("--alpha_causal_cos", type=float, default=0.0, help="Weight of the DIITO cosine loss on counterfactual hidden states.")
    a("--divergence", choices=DIVERGENCES, default="forward_kl",
      help="What the soft-target loss (--alpha_ce) measures between the temperature-softened teacher and student "
           "distributions, times T^2: forward_kl KL(teacher || student) (the original's), reverse_kl "
           "KL(student || teacher), jsd the generalised Jensen-Shannon divergence of GKD (--jsd_beta), tvd the "
           "total variation distance. Computed in row chunks like the KL: no logits are stored.")
    a("--causal_divergence", choices=DIVERGENCES, default=None,
      help="The same for DIITO's counterfactual soft-target loss (--alpha_causal_ce) (default: --divergence).")
    a("--jsd_beta", type=float, default=0.5,
      help="jsd's beta: the divergences to the mixture beta * p_teacher + (1 - beta) * p_student, weighted beta "
           "and 1 - beta; 0 is the forward KL and 1 the reverse KL (TRL's GKD convention).")
    a("--skew", type=float, default=0.0,
      help="DistiLLM's skew for forward_kl and reverse_kl, in [0, 1): the distribution the KL is taken to is "
           "mixed with the other one, KL(p_t || skew p_t + (1 - skew) p_s) and KL(p_s || skew p_s + (1 - skew) p_t). "
           "0: the plain KL.")
    a("--on_policy_fraction", type=float, default=0.0,
      help="On-policy distillation (causal-LM students; GKD's lambda): this share of the micro-batches is replaced "
           "by the student's own continuations of prompts taken from the corpus, which the teacher scores; the "
           "soft-target terms (and DIITO's, base and source both sampled) train on the sampled positions only, the "
           "LM loss skips them. The batches and samples follow from --seed and the batch's place, so a resumed "
           "run draws the same. 0: off.")
    a("--on_policy_prompt_tokens", type=int, default=16,
      help="Corpus tokens kept as the prompt of an on-policy sample (fewer when a sequence of the batch is shorter).")
    a("--on_policy_new_tokens", type=int, default=32,
      help="Tokens the student samples after the prompt (a sequence ends at the first EOS it samples).")
    a("--on_policy_temperature", type=float, default=1.0, help="Sampling temperature of the on-policy continuations.")
    a("--on_policy_top_k", type=int, default=0, help="Sample among the k most likely tokens only (0: all).")
    a("--mlm", action="store_true", help="Masked-LM training (BERT/RoBERTa); otherwise causal LM (GPT-2, Llama, Qwen, ...).")
    a("--mlm_mask_prop", type=float, default=0.15, help="Proportion of tokens chosen for MLM prediction.")
    a("--word_mask", type=float, default=0.8, help="Of the chosen tokens: proportion replaced by [MASK].")
    a("--word_keep", type=float, default=0.1, help="Of the chosen tokens: proportion kept.")
    a("--word_rand", type=float, default=0.1, help="Of the chosen tokens: proportion replaced by a random token.")
    a("--mlm_smoothing", type=float, default=0.7,
      help="Smoothing exponent of the MLM masking: each real token is chosen as a target with weight "
           "max(count, 1)^-smoothing (special tokens never), ceil(mlm_mask_prop x real tokens) per batch, without "
           "replacement, then 80/10/10; exactly the original's prepare_batch_mlm. 0.7 (the original's and HF "
           "DistilBERT's) makes rare tokens far more likely targets than they are in text, so the MLM loss teaches "
           "a label prior skewed towards them: in the quickstart's ablation, students trained with the MLM term "
           "under 0.7 came out worse than their initialisation under uniformly masked held-out evaluation, and "
           "better with 0 (docs/differences.md, docs/quickstart.md). 0 masks uniformly.")
    a("--token_counts", default=None,
      help="Token counts (scripts/token_counts.py: a pickled list of ints or a .npy), required with --mlm.")
    add_interchange_args(p)
    a("--data_augment", action="store_true",
      help="Swap the tokens themselves at the input instead of hidden states.")
    a("--include_crossway", action="store_true",
      help="Also train on the reversed pair (source as base) in the same step; losses are averaged.")
    a("--source_kd", action="store_true",
      help="A control for DIITO: also apply the non-causal losses to the source sequences a DIITO step would "
           "draw (the same pairing), with no intervention; each loss is the mean over the base and source "
           "sequences. It gives standard distillation DIITO's extra sequences without its interchange. Not with "
           "the causal losses or --on_policy_fraction.")
    a("--data_fraction", type=float, default=1.0,
      help="Train on this share of --data_file's sequences, in (0, 1] (default 1: all): the same part for every "
           "--seed and run (a fixed draw), to study distillation with little data.")
    a("--restrict_ce_to_mask", action="store_true", help="Soft-target losses only on MLM-masked tokens.")
    a("--no_shared_prefix", action="store_true",
      help="Run three full forwards per model (plain path, for checking) instead of sharing the base run's prefix.")
    a("--freeze_pos_embs", action="store_true",
      help="Freeze the student's position embeddings (learned positions only; not for rotary families).")
    a("--freeze_token_type_embds", action="store_true", help="Freeze the student's token type embeddings (RoBERTa).")
    a("--n_epoch", type=int, default=3, help="Number of epochs.")
    a("--max_steps", type=int, default=-1, help="Stop after this many optimiser steps (-1: run all epochs).")
    a("--batch_size", type=int, default=5, help="Sequences per micro-batch (per process).")
    a("--group_by_size", action="store_true", help="Batch sequences of similar lengths together.")
    a("--pad_to_multiple_of", type=int, default=None,
      help="Pad each batch to a multiple of this many positions (default: 64 on CUDA, where a handful of "
           "shapes lets cuBLAS and the attention kernels reuse their plans instead of building new ones "
           "for every batch length; 1 on the CPU, which gains nothing from it).")
    a("--gradient_accumulation_steps", type=int, default=50, help="Micro-batches per optimiser step.")
    a("--warmup_prop", type=float, default=0.05, help="Linear warm-up, as a proportion of all steps.")
    a("--weight_decay", type=float, default=0.0, help="AdamW weight decay (not on biases and LayerNorms).")
    a("--learning_rate", type=float, default=5e-4, help="Peak learning rate.")
    a("--adam_epsilon", type=float, default=1e-6, help="AdamW epsilon.")
    a("--max_grad_norm", type=float, default=5.0, help="Gradient clipping norm (0: off).")
    a("--initializer_range", type=float, default=0.02, help="Initialisation range of a student built from scratch.")
    a("--fp16", action="store_true", help="fp16 autocast with a grad scaler (CUDA only).")
    a("--bf16", action="store_true", help="bf16 autocast (CUDA or CPU); the teacher runs in bf16.")
    a("--compile", action="store_true",
      help="Compile the vocabulary-wide KL kernel with torch.compile (Triton on CUDA, C++ on the CPU: needs a C++ "
           "compiler). Fuses the bias, softening, log-softmaxes, loss and gradient; the first step pays the "
           "compile (tens of seconds). The models and their intervention hooks always run eagerly.")
    a("--n_gpu", type=int, default=1, help="GPUs per node (0: CPU). Use torchrun for several.")
    a("--local_rank", type=int, default=-1, help="Set by the launcher; kept for the original's interface.")
    a("--fsdp", action="store_true",
      help="Shard the student over the ranks with PyTorch FSDP2 (fully_shard per block and at the root) instead of "
           "DDP: each rank holds 1/N of its weights, gradients and AdamW state. Needs torchrun "
           "(torchrun --nproc_per_node N causal_train.py --fsdp ...). Checkpoints are sharded (DCP); the final "
           "student is one consolidated HF folder. Which engine when: docs/fsdp.md.")
    a("--fsdp_teacher", action="store_true",
      help="With --fsdp: also shard the frozen teacher (inference only), so that a teacher no single device holds "
           "can serve.")
    a("--fsdp_cpu_offload", action="store_true",
      help="With --fsdp: keep the student's sharded weights, gradients and optimizer state in host memory "
           "(FSDP's CPUOffloadPolicy; the optimizer step runs on the CPU). Saves device memory, costs transfers.")
    a("--seed", type=int, default=56, help="Seed of every random draw (pairs, masks, positions, init).")
    a("--log_interval", type=int, default=None,
      help="Optimiser steps between logs (the only host syncs); a log line and a TensorBoard point each. Default: "
           "500, or the run's steps / 50 when that is less (at least 1), so that a short run logs about 50 points.")
    a("--checkpoint_interval", type=int, default=4000, help="Optimiser steps between checkpoints (0: epoch ends only).")
    a("--save_total_limit", type=int, default=0, help="Keep only the newest N checkpoints (0: keep all).")
    a("--snapshot_interval", type=int, default=0,
      help="Every N optimiser steps also save the student as a plain model folder, <dump_path>/snapshots/step_<n> "
           "(config.json + model.safetensors, no optimiser), for learning curves; 0 (default): none.")
    a("--resume", action="store_true",
      help="Continue from the newest sound checkpoint in --dump_path (checked against its manifest; a damaged one is "
           "named and skipped). A finished run continues too, with a larger --max_steps or --n_epoch.")
    a("--resume_from", default=None, help="Continue from this checkpoint folder (a damaged one is an error).")
    a("--skip_nonfinite_steps", type=int, default=0,
      help="Skip up to N steps whose loss is NaN/inf instead of stopping.")
    a("--num_workers", type=int, default=1,
      help="DataLoader worker processes for collation (they ignore SIGINT/SIGTERM: the trainer owns the shutdown).")
    a("--allow_tokenizer_mismatch", action="store_true",
      help="Train although the --data_file header records another tokenizer (vocabulary fingerprint or size) "
           "than the teacher's (or --tokenizer_name's). Only for a corpus known to use the same ids.")
    a("--max_model_input_size", type=int, default=None,
      help="Longest sequence fed to the models (default: the smaller of teacher and student positions).")
    a("--no_progress", action="store_true", help="No progress bar.")
    a("--is_wandb", action="store_true", help="Log to Weights & Biases.")
    a("--run_name", default=None, help="Run name (wandb).")
    a("--cache_dir", default=None, help="Cache folder for hub downloads.")
    return p


# Every float flag: NaN or an infinity passes the range checks below (nan <= 0 is False) and then
# fails at the first step, or, as --adam_epsilon inf, trains nothing and exits 0.
FLOAT_FLAGS = ("temperature", *(f"alpha_{name}" for name in LOSS_NAMES), "jsd_beta", "skew", "on_policy_fraction",
               "on_policy_temperature", "mlm_mask_prop",
               "word_mask", "word_keep", "word_rand", "mlm_smoothing", "interchange_prop", "warmup_prop", "weight_decay", "learning_rate",
               "adam_epsilon", "max_grad_norm", "initializer_range")


def sanity_checks(args) -> None:
    """Argument checks that need no model."""
    problem = fsdp_flag_problem(args)
    if problem:
        raise CliError(problem)
    for flag in FLOAT_FLAGS:
        value = getattr(args, flag)
        if not math.isfinite(value):
            raise CliError(f"--{flag} must be a finite number, not {value}")
    if args.mlm:
        if args.alpha_clm > 0:
            raise CliError("--alpha_clm must be 0 with --mlm (use --alpha_mlm)")
        if args.teacher_type in CAUSAL_FAMILIES or args.student_type in CAUSAL_FAMILIES:
            raise CliError("--mlm needs masked-LM models (bert/roberta teacher, distilbert/roberta student)")
        if not args.token_counts:
            raise CliError("--mlm needs --token_counts (scripts/token_counts.py)")
    else:
        if args.alpha_mlm > 0:
            raise CliError("--alpha_mlm needs --mlm")
        if args.teacher_type not in CAUSAL_FAMILIES or args.student_type not in CAUSAL_FAMILIES:
            raise CliError(f"causal-LM training (no --mlm) needs causal-LM teacher and student types "
                           f"({', '.join(CAUSAL_FAMILIES)}); got {args.teacher_type} and {args.student_type}")
    if args.freeze_pos_embs and FAMILIES[args.student_type].position_embeddings is None:
        raise CliError(f"--freeze_pos_embs: a {args.student_type} student has rotary positions, no position "
                       f"embeddings to freeze")
    if abs(args.word_mask + args.word_keep + args.word_rand - 1.0) > 1e-6:
        raise CliError("--word_mask + --word_keep + --word_rand must sum to 1")
    if not 0.0 <= args.mlm_mask_prop <= 1.0:
        raise CliError("--mlm_mask_prop must be in [0, 1]")
    if args.mlm and args.mlm_mask_prop == 0:
        uses = [flag for flag, on in (("--alpha_mlm", args.alpha_mlm > 0),
                                      ("--restrict_ce_to_mask", args.restrict_ce_to_mask),
                                      ("--interchange_masked_token_only", args.interchange_masked_token_only)) if on]
        if uses:
            raise CliError(f"--mlm_mask_prop 0 masks no token, so {' and '.join(uses)} would train on nothing (the mlm "
                           f"loss 0 at every step): give a proportion > 0")
    problem = interchange_problem(args)
    if problem:
        raise CliError(problem)
    if args.temperature <= 0:
        raise CliError("--temperature must be > 0")
    alphas = [getattr(args, f"alpha_{name}") for name in LOSS_NAMES]
    if min(alphas) < 0:
        raise CliError("the --alpha_* weights must be >= 0")
    if sum(alphas) <= 0:
        raise CliError("every --alpha_* weight is 0: nothing to train")
    if (args.alpha_causal_ce > 0 or args.alpha_causal_cos > 0) and not args.neuron_mapping:
        raise CliError("--alpha_causal_ce/--alpha_causal_cos need --neuron_mapping")
    for flag, name in (("--divergence", args.divergence), ("--causal_divergence", args.causal_divergence)):
        try:
            Divergence(name or args.divergence, beta=args.jsd_beta, skew=args.skew)
        except ValueError as err:
            raise CliError(f"{flag} {name}: {err} (--jsd_beta {args.jsd_beta}, --skew {args.skew})") from None
    if args.on_policy_fraction:
        on_policy_checks(args)
    if args.source_kd and (args.alpha_causal_ce > 0 or args.alpha_causal_cos > 0 or args.on_policy_fraction):
        raise CliError("--source_kd is standard distillation on the base and source sequences: drop the causal "
                       "losses (--alpha_causal_ce/--alpha_causal_cos 0) and --on_policy_fraction")
    if args.fp16 and args.bf16:
        raise CliError("choose one of --fp16 and --bf16")
    if args.gradient_accumulation_steps < 1 or args.batch_size < 1:
        raise CliError("--batch_size and --gradient_accumulation_steps must be >= 1")
    range_checks(args)
    if args.interchange_masked_token_only and not args.mlm:
        raise CliError("--interchange_masked_token_only needs --mlm")
    if args.compile:
        if args.n_gpu > 0 and torch.cuda.is_available():
            import importlib.util

            if importlib.util.find_spec("triton") is None:
                raise CliError("--compile on CUDA needs triton (pip install triton), or drop --compile")
        elif not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            raise CliError("--compile on the CPU needs a C++ compiler on PATH (c++, g++ or clang++), or drop --compile")


def range_checks(args) -> None:
    """Each numeric flag within its range: CliError naming the flag and the value."""
    for flag, ok, what in (
        ("n_epoch", args.n_epoch >= 1, ">= 1"),
        ("max_steps", args.max_steps == -1 or args.max_steps >= 1, "-1 (all epochs) or >= 1"),
        ("warmup_prop", 0.0 <= args.warmup_prop <= 1.0, "in [0, 1]"),
        ("data_fraction", 0.0 < args.data_fraction <= 1.0, "in (0, 1]"),
        ("learning_rate", args.learning_rate > 0, "> 0"),
        ("log_interval", args.log_interval is None or args.log_interval >= 1, ">= 1"),
        ("checkpoint_interval", args.checkpoint_interval >= 0, ">= 0"),
        ("save_total_limit", args.save_total_limit >= 0, ">= 0"),
        ("snapshot_interval", args.snapshot_interval >= 0, ">= 0"),
        ("skip_nonfinite_steps", args.skip_nonfinite_steps >= 0, ">= 0"),
        ("num_workers", args.num_workers >= 0, ">= 0"),
        ("seed", 0 <= args.seed < 2**32, "in [0, 2**32)"),
        ("n_gpu", args.n_gpu >= 0, ">= 0"),
        ("adam_epsilon", args.adam_epsilon > 0, "> 0"),
        ("weight_decay", args.weight_decay >= 0, ">= 0"),
        ("max_grad_norm", args.max_grad_norm >= 0, ">= 0"),
        ("initializer_range", args.initializer_range > 0, "> 0"),
        ("max_model_input_size", args.max_model_input_size is None or args.max_model_input_size >= 3, ">= 3"),
        ("pad_to_multiple_of", args.pad_to_multiple_of is None or args.pad_to_multiple_of >= 1, ">= 1"),
    ):
        if not ok:
            raise CliError(f"--{flag} must be {what}, not {getattr(args, flag)}")


def on_policy_checks(args) -> None:
    """The --on_policy_* flags: a causal-LM student, and settings that sample something."""
    if args.mlm:
        raise CliError("--on_policy_fraction needs a causal-LM student (it samples continuations): masked LMs "
                       "(--mlm) have no next-token distribution to sample from")
    if args.fsdp:
        raise CliError("--on_policy_fraction does not run with --fsdp yet: sample with DDP (torchrun without --fsdp)")
    for flag, ok, what in (("on_policy_fraction", 0.0 <= args.on_policy_fraction <= 1.0, "in [0, 1]"),
                           ("on_policy_prompt_tokens", args.on_policy_prompt_tokens >= 1, ">= 1"),
                           ("on_policy_new_tokens", args.on_policy_new_tokens >= 1, ">= 1"),
                           ("on_policy_temperature", args.on_policy_temperature > 0, "> 0"),
                           ("on_policy_top_k", args.on_policy_top_k >= 0, ">= 0 (0: every token)")):
        if not ok:
            raise CliError(f"--{flag} must be {what}, not {getattr(args, flag)}")


# --- inputs ------------------------------------------------------------------------------------------
def load_teacher(args):
    """The --teacher_type model of --teacher_name in the training precision; CliError if it cannot load or lacks its LM head."""
    family = FAMILIES[args.teacher_type]
    # In the training precision, not the checkpoint's (transformers 5 loads a bf16 hub checkpoint as bf16).
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    try:
        teacher, info = family.model_class.from_pretrained(args.teacher_name, cache_dir=args.cache_dir,
                                                           output_loading_info=True, dtype=dtype)
    except Exception as err:  # noqa: BLE001 -- OSError, ValueError, a truncated safetensors file: one message
        raise CliError(f"--teacher_name {args.teacher_name}: cannot load a {args.teacher_type} teacher "
                       f"({type(err).__name__}: {err})") from None
    check_config_numbers(teacher.config, f"--teacher_name {args.teacher_name}")
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise CliError(f"--teacher_name {args.teacher_name} lacks weights of {family.model_class.__name__} "
                       f"({_short(missing)}): a model without its LM head would be distilled from a random head; "
                       f"give a teacher saved with its MLM/LM head")
    return teacher


def load_special_tokens(args) -> tuple[dict[str, int], str | None, int]:
    """(the special token ids, the vocabulary fingerprint, the size) of the tokenizer (--tokenizer_name, else
    --teacher_name), checked against the teacher."""
    from transformers import AutoConfig, AutoTokenizer

    check_local_path(args.teacher_name, "--teacher_name")
    check_local_path(args.tokenizer_name, "--tokenizer_name")
    name = args.tokenizer_name or args.teacher_name
    try:
        tok = AutoTokenizer.from_pretrained(name, cache_dir=args.cache_dir)
        teacher_config = AutoConfig.from_pretrained(args.teacher_name, cache_dir=args.cache_dir)
    except (OSError, ValueError) as err:
        raise CliError(f"cannot load the tokenizer {name} or the config of --teacher_name {args.teacher_name} "
                       f"(set --tokenizer_name): {err}") from None
    check_tokenizer(tok, teacher_config, tokenizer_flag="--tokenizer_name",
                    tokenizer_name=args.tokenizer_name or f"(not given, so read from --teacher_name {name})",
                    model_name=f"teacher {args.teacher_name}")
    ids = {}
    for key in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token", "bos_token", "eos_token"):
        tid = getattr(tok, f"{key}_id", None)
        if tid is not None:
            ids[key] = int(tid)
    if args.mlm:
        missing = [k for k in ("cls_token", "sep_token", "pad_token", "unk_token", "mask_token") if k not in ids]
        if missing:
            raise CliError(f"tokenizer {name} lacks {missing}, needed for MLM")
    else:
        ids.setdefault("pad_token", ids.get("eos_token", 0))
        ids.setdefault("unk_token", ids.get("eos_token", 0))
        ids.setdefault("cls_token", ids.get("bos_token", ids.get("eos_token", 0)))
        ids.setdefault("sep_token", ids.get("eos_token", 0))
    return ids, vocab_fingerprint(tok), len(tok)


def build_student(args):
    """The --student_type model of --student_config, from --student_pretrained_weights (a .pth or a folder) or at random; CliError when they do not match."""
    family = FAMILIES[args.student_type]
    require_file(args.student_config, "--student_config")
    try:
        config = family.config_class.from_pretrained(args.student_config)
    except (OSError, ValueError) as err:
        raise CliError(f"--student_config {args.student_config}: not a {args.student_type} config ({err})") from None
    if getattr(config, "model_type", None) != family.name:
        raise CliError(f"--student_config {args.student_config} is a {config.model_type!r} config, "
                       f"not {args.student_type!r}")
    check_config_numbers(config, f"--student_config {args.student_config}")
    config.initializer_range = args.initializer_range
    try:
        model = family.model_class(config)
    except (ValueError, AttributeError, TypeError) as err:  # e.g. heads that do not divide the width
        raise CliError(f"--student_config {args.student_config}: cannot build a {args.student_type} from it ({err})") from None
    if args.student_pretrained_weights is None:
        logger.info("student initialised at random from %s", args.student_config)
        return model
    weights = Path(require_file(args.student_pretrained_weights, "--student_pretrained_weights"))
    if weights.is_dir():
        from safetensors.torch import load_file

        files = sorted(weights.glob("*.safetensors")) or sorted(weights.glob("pytorch_model*.bin"))
        if not files:
            raise CliError(f"--student_pretrained_weights {weights}: no model weights in this folder")
        state = {}
        for f in files:
            try:
                state.update(load_file(str(f)) if f.suffix == ".safetensors"
                             else torch.load(f, map_location="cpu", weights_only=True))
            except Exception as err:  # noqa: BLE001 -- a truncated or corrupt file: one message
                raise CliError(f"--student_pretrained_weights {f}: cannot read the weights "
                               f"({short_load_error(err)})") from None
    else:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 -- any unreadable file gets one clear message
            raise CliError(f"--student_pretrained_weights {weights}: not a torch state dict "
                           f"({short_load_error(err)})") from None
    expected = model.state_dict()
    # The MLM head's transform is copied only with --vocab_transform at extraction.
    optional = {k for k in expected if k.startswith(("vocab_transform", "vocab_layer_norm", "lm_head.dense",
                                                      "lm_head.layer_norm"))}
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in expected if k not in state and k not in optional and k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CliError(
            f"--student_pretrained_weights {weights} does not match --student_config {args.student_config} "
            f"({config.num_hidden_layers} layers): missing {_short(missing)}, unexpected {_short(unexpected)}. "
            f"Extract with --num_layers {config.num_hidden_layers} or use the config of that depth."
        )
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if k in state and state[k].shape != v.shape]
    if bad:
        raise CliError(f"--student_pretrained_weights {weights}: shapes differ from the config: {_short(bad)}")
    model.load_state_dict(state, strict=False)
    not_loaded = sorted(k for k in optional if k not in state)
    if not_loaded:
        logger.info("student keys initialised at random (not in the weights): %s", not_loaded)
    logger.info("student initialised from %s", weights)
    return model


def _short(items, n=6):
    items = list(items)
    return str(items[:n])[:-1] + (f", ... {len(items) - n} more]" if len(items) > n else "]")


def model_checks(args, student, teacher) -> None:
    """Teacher and student must share the vocabulary (and the hidden size when a cosine loss is on)."""
    s_vocab, t_vocab = student.config.vocab_size, teacher.config.vocab_size
    if s_vocab != t_vocab:
        raise CliError(f"vocabulary sizes differ: student config {args.student_config} has {s_vocab}, "
                       f"teacher {args.teacher_name} has {t_vocab}")
    if (args.alpha_cos > 0 or args.alpha_causal_cos > 0) and student.config.hidden_size != teacher.config.hidden_size:
        raise CliError(f"--alpha_cos/--alpha_causal_cos need equal hidden sizes: student "
                       f"{student.config.hidden_size}, teacher {teacher.config.hidden_size}")


def max_positions(model) -> int:
    """The longest input the model's position table takes (RoBERTa reserves two rows)."""
    c = model.config
    n = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions")
    return n - 2 if c.model_type == "roberta" else n


def check_corpus(config: DistillConfig, corpus, vocab: int) -> None:
    """The corpus must be intact and made with the teacher's tokenizer (ids within the models' vocabulary)."""
    if corpus.format == "mmap" and corpus.verify_checksum(config.data_fingerprint.get("blake2b_from_4096")):
        logger.info("--data_file %s matches the checksum recorded when it was written", config.data_file)
    if corpus.vocab_size is not None and corpus.vocab_size > vocab:
        raise CliError(f"--data_file {config.data_file} was binarized with a vocabulary of {corpus.vocab_size} "
                       f"entries but the models have {vocab}: binarized with another tokenizer?")
    tok_name = config.tokenizer_name or config.teacher_name
    differs = []
    if corpus.vocab_hash and corpus.vocab_hash != config.tokenizer_vocab_hash:
        differs.append(f"vocabulary fingerprint {corpus.vocab_hash} vs {config.tokenizer_vocab_hash}")
    if corpus.vocab_size is not None and corpus.vocab_size != config.tokenizer_size:
        differs.append(f"vocabulary size {corpus.vocab_size} vs {config.tokenizer_size}")
    if differs:
        message = (f"--data_file {config.data_file} was binarized with another tokenizer than {tok_name} "
                   f"({'; '.join(differs)})")
        if not config.allow_tokenizer_mismatch:
            raise CliError(message + ": binarize it with this tokenizer, or add --allow_tokenizer_mismatch if "
                                     "its ids are known to be the same")
        logger.warning("%s; going on (--allow_tokenizer_mismatch)", message)
    corpus.check_ids(vocab, "--data_file")  # ids within the models' vocabulary, none negative


# --- the run ---------------------------------------------------------------------------------------
@dataclass
class Run:
    """What `build` assembles: the config, the models (on the device), the data and the distiller with its
    optimiser."""

    config: DistillConfig
    teacher: nn.Module
    student: nn.Module
    dataset: LmSeqsDataset
    distiller: CausalDistiller

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.distiller.optimizer


def start_runtime(args) -> Runtime:
    """This process's device and ranks (`devices.init_runtime`), the CPU allocator tuned and every seed set."""
    tune_cpu_allocator()
    if args.n_gpu > 0 and (args.bf16 or args.fp16) and not torch.cuda.is_available():
        precision = "--bf16" if args.bf16 else "--fp16"
        cpu_bf16 = "" if args.fp16 else ("; add --bf16 only on a CPU with bf16 instructions (elsewhere it is emulated, "
                                         "several times slower than fp32)")
        raise CliError(f"--n_gpu {args.n_gpu} {precision}: torch sees no CUDA GPU here. To train on the CPU, run the "
                       f"same command with --n_gpu 0 (fp32){cpu_bf16}")
    runtime = init_runtime(args.n_gpu, args.local_rank, args.fsdp)
    if args.fp16 and runtime.device.type != "cuda":
        raise CliError("--fp16 needs a CUDA device; use --bf16 on the CPU")
    if args.bf16 and runtime.device.type == "cpu" and (warning := cpu_bf16_warning()):
        logger.warning("--bf16: %s", warning)
    set_seed(args.seed)
    return runtime


def build(args, runtime: Runtime) -> Run:
    """Load and check every input named by `args` (parsed and `sanity_checks`-ed), make the run's
    `DistillConfig` (once: the flags, `runtime` and what the inputs gave) and assemble the run.
    Writes nothing. Raises CliError naming the input at fault."""
    require_corpus(args.data_file, "--data_file")
    data_fingerprint = file_fingerprint(args.data_file)
    special_tok_ids, vocab_hash, tokenizer_size = load_special_tokens(args)
    teacher = load_teacher(args)
    student = build_student(args)
    model_checks(args, student, teacher)
    longest = min(max_positions(teacher), max_positions(student))
    if args.max_model_input_size is not None and args.max_model_input_size > longest:
        raise CliError(f"--max_model_input_size {args.max_model_input_size} is beyond the models' positions "
                       f"(teacher {max_positions(teacher)}, student {max_positions(student)})")
    config = DistillConfig.from_args(
        args, runtime, special_tok_ids=special_tok_ids, tokenizer_vocab_hash=vocab_hash, tokenizer_size=tokenizer_size,
        data_fingerprint=data_fingerprint, max_model_input_size=args.max_model_input_size or longest,
        # a handful of batch shapes on CUDA; nothing to gain on the CPU
        pad_to_multiple_of=args.pad_to_multiple_of or (64 if runtime.device.type == "cuda" else 1))
    mappings = None
    if config.neuron_mapping:
        mappings = load_neuron_mapping(config.neuron_mapping, model_shape(teacher), model_shape(student))
        logger.info("neuron mapping %s: %d entries", config.neuron_mapping, len(mappings))
    token_probs = None
    if config.mlm:
        token_probs = load_token_probs(config.token_counts, config.mlm_smoothing, student.config.vocab_size,
                                       special_tok_ids)
    corpus = load_corpus(config.data_file)
    check_corpus(config, corpus, student.config.vocab_size)
    ids = special_tok_ids
    dataset = LmSeqsDataset(
        data=corpus,
        max_model_input_size=config.max_model_input_size,
        cls_id=ids["cls_token"], sep_id=ids["sep_token"], pad_id=ids["pad_token"], unk_id=ids["unk_token"],
        seed=config.seed,
        paired=config.alpha_causal_ce > 0 or config.alpha_causal_cos > 0 or config.source_kd,
        fraction=config.data_fraction,
    )
    return build_from_models(config, teacher, student, dataset, token_probs, mappings)


def build_from_models(config: DistillConfig, teacher: nn.Module, student: nn.Module, dataset,
                      token_probs: torch.Tensor | None, mappings: list[MappingEntry] | None) -> Run:
    """The second half of `build`, for models and data already in memory: freeze the embeddings
    the flags name, move both models to the device, freeze the teacher, and make the distiller.
    Under --fsdp (--fsdp_teacher) the student (teacher) stays where it is: `fully_shard` moves each
    block's shard to the device as it shards it, so the whole model never sits on one device."""
    family = family_of(student)
    if config.freeze_pos_embs:
        get_submodule(student, family.position_embeddings).weight.requires_grad = False
    if config.freeze_token_type_embds and family.token_type_embeddings:
        get_submodule(student, family.token_type_embeddings).weight.requires_grad = False
    if not config.fsdp:
        student.to(config.device)
    if not (config.fsdp and config.fsdp_teacher):
        teacher.to(config.device)
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad = False
    distiller = CausalDistiller(config, dataset, token_probs, student, teacher, mappings)
    return Run(config=config, teacher=teacher, student=student, dataset=dataset, distiller=distiller)
