#!/usr/bin/env python
"""Interchange-intervention accuracy (IIA) of a student against its teacher.

For each base/source pair of held-out sequences and each entry of a neuron mapping, teacher and
student run the same counterfactual: the base input, with the activations of the aligned site
(the output of a block, some hidden dimensions) at the interchanged positions taken from the
source run. Both models see the very same masked input, masked positions and interchange
positions (drawn once per batch, seeded by --seed), through the project's own intervention code
(`interventions.model_outputs`, the function DIITO trains with; the evaluation is `iia.py`).
Reported, per mapping entry and over all entries together, each with a bootstrap 95% interval
over pairs:

  IIA               share of evaluated positions where the student's counterfactual top-1 prediction
                    equals the teacher's (masked positions for masked LMs; every real position that
                    has a next token for causal LMs)
  effective IIA     the same, only where the intervention changed the teacher's own top-1 prediction
                    (where the intervention matters); `changed` is the share of such positions
  base agreement    top-1 agreement without intervention, the yardstick IIA is read against
  KL                mean counterfactual KL(teacher || student) at temperature 1 (nats)
  chance            effective IIA expected if the two predictions were independent draws from their
                    own frequencies at the changed positions

    python run_iia.py --teacher_name ./teacher --student_name ./student --tokenizer_name ./teacher \\
        --neuron_mapping training_configs/single_middle_layer_6.nm --data_file heldout.txt --output_dir ./iia
    python run_iia.py ... --sweep        # every (teacher block, student block) pair, full width, + heatmap

Writes `iia_results.json` (and, with --sweep, `iia_heatmap.png`) in --output_dir, atomically, and a
table on stdout. Same command, same numbers: the pairs, masks and positions depend only on --seed,
--num_pairs and --batch_size.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from batching import BatchPreparer, add_interchange_args, interchange_problem, load_token_probs
from binarized_io import MAGIC, load_corpus
from iia import choose_pairs, draw_heatmaps, evaluate, format_table, prepare_batches, summarize, sweep_entries
from input_checks import check_config_numbers
from interventions import FAMILIES, model_shape
from lm_seqs_dataset import LmSeqsDataset
from neuron_mapping import MappingEntry, load_neuron_mapping
from atomic_files import atomic_write_text, writing_into
from utils import check_output_parent, check_writable, CliError, logger, run_cli

RESULTS_FILE = "iia_results.json"
HEATMAP_FILE = "iia_heatmap.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--teacher_name", required=True, help="Teacher: a local HF model folder or a hub name (family from its config).")
    a("--student_name", required=True,
      help="Student: a local HF model folder (causal_train.py's --dump_path) or a hub name; any family of the "
           "family table, the teacher itself included.")
    a("--tokenizer_name", default=None,
      help="Tokenizer of the teacher (default: --teacher_name). Needed for a text --data_file and for the "
           "special token ids; checked against the teacher's vocabulary.")
    a("--neuron_mapping", default=None,
      help="A .nm file; every entry is evaluated separately. Optional with --sweep.")
    a("--sweep", action="store_true",
      help="Also evaluate every (teacher block, student block) pair of full-width sites and draw the alignment "
           f"heatmap {HEATMAP_FILE} (teacher block x student block, colour = IIA).")
    a("--data_file", required=True,
      help="Held-out data: a binarized .bin / .pickle file (scripts/binarized_data.py, told apart by its first "
           "bytes) or a UTF-8 text file, one document per line, tokenized on the fly.")
    a("--output_dir", required=True, help=f"Where {RESULTS_FILE} (and {HEATMAP_FILE}) are written.")
    a("--num_pairs", type=int, default=512,
      help="Base/source pairs evaluated (default 512); more than the data holds: a warning, and all of them.")
    a("--seed", type=int, default=42, help="Seed of the pairs, the masks and the interchange positions.")
    a("--batch_size", type=int, default=32, help="Pairs per forward pass (default 32).")
    a("--max_seq_length", type=int, default=None,
      help="Longest sequence (default: the smaller position table of the two models); longer ones are split.")
    add_interchange_args(p)
    a("--mlm_mask_prop", type=float, default=0.15, help="Share of real tokens masked and evaluated (masked LMs).")
    a("--word_mask", type=float, default=0.8, help="Of the masked tokens: share replaced by [MASK].")
    a("--word_keep", type=float, default=0.1, help="Of the masked tokens: share kept.")
    a("--word_rand", type=float, default=0.1, help="Of the masked tokens: share replaced by a random token.")
    a("--token_counts", default=None,
      help="Token counts pickle: choose masked tokens by smoothed frequency as training does (default: uniformly "
           "over non-special tokens).")
    a("--mlm_smoothing", type=float, default=0.7,
      help="Smoothing exponent with --token_counts: weight max(count, 1)^-smoothing, as causal_train.py's "
           "--mlm_smoothing (0.7 favours rare tokens).")
    a("--n_bootstrap", type=int, default=1000, help="Bootstrap resamples of the pairs for the 95%% intervals.")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA if available, else the CPU.")
    a("--bf16", action="store_true", help="bf16 autocast (CUDA, or CPUs with bf16 instructions).")
    a("--cache_dir", default=None, help="Cache folder for hub downloads.")
    a("--no_progress", action="store_true", help="No progress bar.")
    return p


def check_args(args) -> None:
    if not args.neuron_mapping and not args.sweep:
        raise CliError("nothing to evaluate: pass --neuron_mapping FILE and/or --sweep")
    for flag in ("num_pairs", "batch_size", "n_bootstrap"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    problem = interchange_problem(args)
    if problem:
        raise CliError(problem)
    if not 0.0 < args.mlm_mask_prop <= 1.0:
        raise CliError(f"--mlm_mask_prop must lie in (0, 1], got {args.mlm_mask_prop}")
    if abs(args.word_mask + args.word_keep + args.word_rand - 1.0) > 1e-6:
        raise CliError("--word_mask + --word_keep + --word_rand must sum to 1")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise CliError(f"--output_dir {args.output_dir} is a file, not a folder")
    check_writable(check_output_parent(args.output_dir, "--output_dir", is_file=False), "--output_dir")


# --- models, tokenizer, data -------------------------------------------------------------------
def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "/" in name and Path(name).expanduser().parent.exists()


def load_lm(name: str, flag: str, cache_dir: str | None = None):
    """The LM of `name` as the model class of its family row; CliError naming `flag` otherwise."""
    from transformers import AutoConfig

    if _looks_local(name) and not Path(name).expanduser().exists():
        raise CliError(f"{flag} {name}: no such folder")
    try:
        config = AutoConfig.from_pretrained(name, cache_dir=cache_dir)
    except (OSError, ValueError, KeyError) as err:
        raise CliError(f"{flag} {name}: cannot load a model config ({err})") from None
    check_config_numbers(config, f"{flag} {name}")
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise CliError(f"{flag} {name}: model type {config.model_type!r} is not in the family table "
                       f"({', '.join(sorted(FAMILIES))})")
    try:
        model = family.model_class.from_pretrained(name, config=config, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 -- OSError, a truncated or corrupt safetensors file: one message
        raise CliError(f"{flag} {name}: cannot load the {family.name} weights (missing, truncated or corrupt?): "
                       f"{type(err).__name__}: {err}") from None
    return model.eval()


def check_pair(teacher, student, args) -> None:
    """The two models must predict over the same vocabulary in the same way (both masked or both causal)."""
    t_fam, s_fam = FAMILIES[teacher.config.model_type], FAMILIES[student.config.model_type]
    if t_fam.mlm != s_fam.mlm:
        kinds = {True: "masked LM", False: "causal LM"}
        raise CliError(f"--teacher_name {args.teacher_name} is a {kinds[t_fam.mlm]} ({t_fam.name}) but --student_name "
                       f"{args.student_name} is a {kinds[s_fam.mlm]} ({s_fam.name}): their predictions cannot be compared")
    if teacher.config.vocab_size != student.config.vocab_size:
        raise CliError(f"vocabularies differ: --teacher_name {args.teacher_name} has {teacher.config.vocab_size} "
                       f"entries, --student_name {args.student_name} has {student.config.vocab_size}")


def load_tokenizer_and_special_ids(name: str, vocab_size: int, mlm: bool, cache_dir: str | None = None):
    """(tokenizer, special ids); CliError naming --tokenizer_name if it does not belong to the models."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, cache_dir=cache_dir)
    except (OSError, ValueError, TypeError) as err:
        raise CliError(f"--tokenizer_name {name}: cannot load a tokenizer ({err})") from None
    # A folder without tokenizer files loads as a handful of special tokens under transformers 5.
    if len(tok) > vocab_size or len(tok) < vocab_size // 2:
        raise CliError(f"--tokenizer_name {name}: {len(tok)} entries for models of {vocab_size}; pass the tokenizer "
                       f"the teacher was trained with (a student folder holds none)")
    ids = {k: getattr(tok, f"{k}_token_id", None) for k in ("cls", "sep", "pad", "unk", "mask", "bos", "eos")}
    special = {
        "cls": ids["cls"] if ids["cls"] is not None else ids["bos"] if ids["bos"] is not None else ids["eos"],
        "sep": ids["sep"] if ids["sep"] is not None else ids["eos"],
        "pad": ids["pad"] if ids["pad"] is not None else ids["eos"],
        "unk": ids["unk"], "mask": ids["mask"],
    }
    needed = ("cls", "sep", "pad", "mask") if mlm else ("cls", "sep", "pad")
    missing = [k for k in needed if special[k] is None]
    if missing:
        raise CliError(f"--tokenizer_name {name}: lacks {', '.join(k + '_token' for k in missing)}")
    return tok, special


def _is_binarized(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(len(MAGIC))
    return head == MAGIC or head[:1] == b"\x80"


def load_pairs(path: str, tok, special: dict, max_len: int, seed: int, vocab_size: int | None = None) -> LmSeqsDataset:
    """Paired sequences of a binarized file or a text file; CliError when the file holds fewer than 2."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"--data_file {path}: no such file")
    if _is_binarized(file):
        data = load_corpus(file)
        data.check_ids(len(tok) if vocab_size is None else vocab_size, "--data_file")
    else:
        try:
            lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as err:
            raise CliError(f"--data_file {path}: neither a binarized corpus nor UTF-8 text ({err})") from None
        encoded = tok(lines, add_special_tokens=False)["input_ids"] if lines else []
        data = [np.asarray([special["cls"], *ids, special["sep"]], dtype=np.int64) for ids in encoded]
    n_raw = len(data)
    try:
        dataset = LmSeqsDataset(data=data, max_model_input_size=max_len, cls_id=special["cls"],
                                sep_id=special["sep"], pad_id=special["pad"], unk_id=special["unk"], seed=seed,
                                paired=False)
    except CliError as err:
        raise CliError(f"--data_file {path}: {err}") from None
    except ValueError as err:  # an empty in-memory corpus
        raise CliError(f"--data_file {path}: no sequences ({err})") from None
    if n_raw == 0 or len(dataset) < 2:
        raise CliError(f"--data_file {path}: {len(dataset)} usable sequence(s) of 12 tokens or more (of {n_raw}); "
                       f"IIA needs at least 2 to pair a base with a source")
    dataset.paired = True
    dataset.set_epoch(0)  # each item's source: a seeded derangement, never the item itself
    return dataset


def token_weights(args, vocab_size: int, special: dict) -> torch.Tensor:
    """Masking weight of each token id: uniform, or smoothed frequency with --token_counts (as training)."""
    if args.token_counts:
        return load_token_probs(args.token_counts, args.mlm_smoothing, vocab_size,
                                {k: v for k, v in special.items() if v is not None})
    probs = torch.ones(vocab_size)
    for tid in special.values():
        if tid is not None:
            probs[tid] = 0.0
    return probs


# --- command line ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda: torch sees no CUDA device")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    teacher = load_lm(args.teacher_name, "--teacher_name", args.cache_dir)
    student = load_lm(args.student_name, "--student_name", args.cache_dir)
    check_pair(teacher, student, args)
    mlm = FAMILIES[teacher.config.model_type].mlm
    vocab = teacher.config.vocab_size
    tok, special = load_tokenizer_and_special_ids(args.tokenizer_name or args.teacher_name, vocab, mlm, args.cache_dir)

    entries: list[MappingEntry] = []
    if args.neuron_mapping:
        entries = load_neuron_mapping(args.neuron_mapping, model_shape(teacher), model_shape(student))
    sweep = sweep_entries(teacher, student) if args.sweep else []

    positions = [getattr(m.config, "max_position_embeddings", None) or m.config.n_positions for m in (teacher, student)]
    positions = [n - 2 if m.config.model_type == "roberta" else n for n, m in zip(positions, (teacher, student))]
    max_len = min(positions + ([args.max_seq_length] if args.max_seq_length else []))
    dataset = load_pairs(args.data_file, tok, special, max_len, args.seed, vocab)
    pairs = choose_pairs(dataset, args.num_pairs, args.seed)
    preparer = BatchPreparer(
        mlm=mlm, vocab_size=vocab, mask_id=special["mask"],
        token_probs=token_weights(args, vocab, special) if mlm else None, mlm_mask_prop=args.mlm_mask_prop,
        pred_probs=(args.word_mask, args.word_keep, args.word_rand), restrict_ce_to_mask=True,
        interchange_prop=args.interchange_prop, interchange_max_token=args.interchange_max_token,
        interchange_mode="consecutive" if args.interchange_consecutive_only else "random",
        masked_only=args.interchange_masked_token_only and mlm,
    )
    batches = prepare_batches(dataset, pairs, preparer, args.batch_size, args.seed)
    teacher.to(device)
    student.to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext
    logger.info("IIA of %s against %s: %d pairs, %d mapping entries%s, on %s", args.student_name, args.teacher_name,
                len(pairs), len(entries), f" + {len(sweep)} sweep sites" if sweep else "", device)
    counts = evaluate(teacher, student, batches, entries + sweep, device=device, autocast=autocast,
                      progress=not args.no_progress)
    e = len(entries)
    split = {"base": counts["base"], "entries": counts["entries"][:, :e], "top1": counts["top1"][:e]}
    record = {
        "teacher": args.teacher_name, "student": args.student_name,
        "families": {"teacher": teacher.config.model_type, "student": student.config.model_type},
        "neuron_mapping": args.neuron_mapping, "data_file": args.data_file, "seed": args.seed,
        "evaluated_positions": "masked tokens" if mlm else "every real token with a next token",
        "settings": {k: getattr(args, k) for k in ("num_pairs", "batch_size", "max_seq_length", "interchange_prop",
                                                     "interchange_max_token", "interchange_consecutive_only",
                                                     "interchange_masked_token_only", "mlm_mask_prop", "token_counts",
                                                     "n_bootstrap", "bf16")},
    }
    if entries:
        record["mapping"] = summarize(split, entries, args.n_bootstrap, args.seed)
    if sweep:
        sub = {"base": counts["base"], "entries": counts["entries"][:, e:], "top1": counts["top1"][e:]}
        record["sweep"] = summarize(sub, sweep, args.n_bootstrap, args.seed)
    out = Path(args.output_dir)
    with writing_into(out, "--output_dir"):  # a full disk: one message, and no empty folder left
        out.mkdir(parents=True, exist_ok=True)
        if sweep:
            draw_heatmaps([("", record["sweep"])], out / HEATMAP_FILE)
        atomic_write_text(out / RESULTS_FILE, json.dumps(record, indent=2) + "\n")
    for name in ("mapping", "sweep"):
        if name in record:
            sys.stdout.write(f"\n{name} ({args.neuron_mapping if name == 'mapping' else 'full-width sites'}):\n"
                             f"{format_table(record[name])}\n")
    logger.info("written: %s%s", out / RESULTS_FILE, f" and {out / HEATMAP_FILE}" if sweep else "")
    return record


if __name__ == "__main__":
    run_cli(main)
