#!/usr/bin/env python
"""Interchange-intervention accuracy (IIA) of a student against its teacher.

For each base/source pair of held-out sequences and each entry of a neuron mapping, teacher and
student run the same counterfactual: the base input, with the activations of the aligned site
(the output of a block, some hidden dimensions) at the interchanged positions taken from the
source run. Both models see the very same masked input, masked positions and interchange
positions (drawn once per batch, seeded by --seed), through the project's own intervention code
(`interventions.model_outputs`, the function DIITO trains with). Reported, per mapping entry
and over all entries together, each with a bootstrap 95% interval over pairs:

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
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from batching import BatchPreparer, Prepared, load_token_probs
from binarized_io import MAGIC, load_corpus
from interventions import FAMILIES, Needs, model_outputs, model_shape
from lm_seqs_dataset import LmSeqsDataset
from neuron_mapping import MappingEntry, load_neuron_mapping
from utils import CliError, atomic_open, atomic_write_text, logger, run_cli

RESULTS_FILE = "iia_results.json"
HEATMAP_FILE = "iia_heatmap.png"
NEEDS = Needs(logits=True, hidden=False, cf_logits=True, cf_hidden=False, teacher_logits=True)
FIELDS = ("positions", "hits", "changed", "changed_hits", "kl")  # per pair and entry
CHUNK = 1024  # rows projected onto the vocabulary at a time


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
    a("--interchange_prop", type=float, default=0.3,
      help="Interchanged positions per pair: int(min(len_base, len_source) * prop), as causal_train.py.")
    a("--interchange_max_token", type=int, default=-1, help="Cap on interchanged positions per pair (-1: none).")
    a("--interchange_consecutive_only", action="store_true", help="Interchange one consecutive span per pair.")
    a("--interchange_masked_token_only", action="store_true",
      help="Choose base positions among the masked tokens only (masked LMs).")
    a("--mlm_mask_prop", type=float, default=0.15, help="Share of real tokens masked and evaluated (masked LMs).")
    a("--word_mask", type=float, default=0.8, help="Of the masked tokens: share replaced by [MASK].")
    a("--word_keep", type=float, default=0.1, help="Of the masked tokens: share kept.")
    a("--word_rand", type=float, default=0.1, help="Of the masked tokens: share replaced by a random token.")
    a("--token_counts", default=None,
      help="Token counts pickle: choose masked tokens by smoothed frequency as training does (default: uniformly "
           "over non-special tokens).")
    a("--mlm_smoothing", type=float, default=0.7, help="Smoothing exponent with --token_counts.")
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
    if not 0.0 < args.interchange_prop <= 1.0:
        raise CliError(f"--interchange_prop must lie in (0, 1], got {args.interchange_prop}")
    if not 0.0 < args.mlm_mask_prop <= 1.0:
        raise CliError(f"--mlm_mask_prop must lie in (0, 1], got {args.mlm_mask_prop}")
    if abs(args.word_mask + args.word_keep + args.word_rand - 1.0) > 1e-6:
        raise CliError("--word_mask + --word_keep + --word_rand must sum to 1")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        raise CliError(f"--output_dir {args.output_dir} is a file, not a folder")


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
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is None:
        raise CliError(f"{flag} {name}: model type {config.model_type!r} is not in the family table "
                       f"({', '.join(sorted(FAMILIES))})")
    try:
        model = family.model_class.from_pretrained(name, config=config, cache_dir=cache_dir)
    except (OSError, ValueError, RuntimeError) as err:
        raise CliError(f"{flag} {name}: cannot load the {family.name} weights ({err})") from None
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


def load_tokenizer(name: str, vocab_size: int, mlm: bool, cache_dir: str | None = None):
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


def load_dataset(path: str, tok, special: dict, max_len: int, seed: int) -> LmSeqsDataset:
    """Paired sequences of a binarized file or a text file; CliError when the file holds fewer than 2."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"--data_file {path}: no such file")
    if _is_binarized(file):
        data = load_corpus(file)
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


def sweep_entries(teacher, student) -> list[MappingEntry]:
    """Every (teacher block, student block) pair of full-width sites, teacher-major."""
    t, s = model_shape(teacher), model_shape(student)
    entries = []
    for tl in range(t.n_layers):
        for sl in range(s.n_layers):
            names = (f"$L:{tl}$H:[0:{t.n_heads}]$[0:{t.head_dim}]", f"$L:{sl}$H:[0:{s.n_heads}]$[0:{s.head_dim}]")
            entries.append(MappingEntry(len(entries), {tl: tuple(range(t.hidden_size))},
                                        {sl: tuple(range(s.hidden_size))}, (names[0],), (names[1],)))
    return entries


# --- the evaluation ----------------------------------------------------------------------------
def choose_pairs(dataset: LmSeqsDataset, num_pairs: int, seed: int) -> np.ndarray:
    """Indices of the base items (each paired with `dataset.pairing[i]`), seeded; all of them if too few."""
    n = len(dataset)
    if num_pairs > n:
        logger.warning("--num_pairs %d is more than the %d pairs the data holds: using %d", num_pairs, n, n)
        num_pairs = n
    return np.sort(np.random.default_rng([seed, 1]).choice(n, size=num_pairs, replace=False))


def prepare_batches(dataset: LmSeqsDataset, pairs: np.ndarray, preparer: BatchPreparer, batch_size: int,
                    seed: int) -> list[Prepared]:
    """The evaluation's batches: masked input, evaluated positions and interchange positions, drawn once.

    Each batch's draws come from a generator seeded by (seed, batch index) alone, so they do not
    depend on anything run before; teacher and student (and every mapping entry) get the same
    Prepared. `logit_idx` is narrowed to the evaluated positions (masked, or with a next token).
    """
    batches = []
    for k, start in enumerate(range(0, len(pairs), batch_size)):
        batch = dataset.batch_sequences([dataset[int(i)] for i in pairs[start:start + batch_size]])
        with torch.random.fork_rng(devices=[]):  # BatchPreparer draws from torch's global generator
            torch.manual_seed(seed * 1_000_003 + k)
            p = preparer.prepare(batch, causal=True)
        evaluated = p.logit_idx.index_select(0, p.lm_rows)
        batches.append(replace(p, logit_idx=evaluated, lm_rows=torch.arange(evaluated.numel())))
    return batches


def kl_per_row(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(t) || softmax(s)) of each row at T = 1: the rows of `losses.soft_target_kl` (tested equal)."""
    t_log = torch.log_softmax(t_logits.float(), dim=-1)
    return (t_log.exp() * (t_log - torch.log_softmax(s_logits.float(), dim=-1))).sum(-1)


def _top1_and_kl(t_out, s_out, counterfactual: bool):
    """Top-1 ids of teacher and student and the KL of each row, projected CHUNK rows at a time."""
    t_feat = t_out.cf_features if counterfactual else t_out.features
    s_feat = s_out.cf_features if counterfactual else s_out.features
    t_top, s_top, kl = [], [], []
    for i in range(0, t_feat.shape[0], CHUNK):
        t_logits = t_out.projection(t_feat[i:i + CHUNK])
        s_logits = s_out.projection(s_feat[i:i + CHUNK])
        t_top.append(t_logits.argmax(-1))
        s_top.append(s_logits.argmax(-1))
        kl.append(kl_per_row(t_logits, s_logits))
    cat = (lambda xs: torch.cat(xs).cpu()) if t_feat.shape[0] else (lambda xs: torch.zeros(0))
    return cat(t_top).long(), cat(s_top).long(), cat(kl).double()


def _sites(sites: dict[int, tuple[int, ...]], device) -> dict[int, torch.Tensor]:
    return {layer: torch.tensor(dims, dtype=torch.long, device=device) for layer, dims in sites.items()}


@torch.inference_mode()
def evaluate(teacher, student, batches: list[Prepared], entries: list[MappingEntry], *, device=None,
             autocast=contextlib.nullcontext, progress: bool = False) -> dict:
    """Counts per pair: `base` (n_pairs, 2) [positions, agreeing], `entries` (n_pairs, E, 5) of FIELDS,
    and `top1` {entry: (teacher bincount, student bincount)} over the changed positions (for chance)."""
    from tqdm import tqdm

    device = device or next(teacher.parameters()).device
    n_pairs = sum(int(p.input_ids.shape[0]) for p in batches)
    vocab = teacher.config.vocab_size
    base = np.zeros((n_pairs, 2))
    counts = np.zeros((n_pairs, len(entries), len(FIELDS)))
    hist = np.zeros((len(entries), 2, vocab))
    sites = [(_sites(e.teacher, device), _sites(e.student, device)) for e in entries]
    bar = tqdm(total=len(batches) * len(entries), desc="IIA", disable=not progress, dynamic_ncols=True)
    row0 = 0
    for p in batches:
        bsz, width = p.input_ids.shape
        rows = row0 + (p.logit_idx // width).numpy()  # the pair of each evaluated position
        row0 += bsz
        p = p.to(device)
        for e, (t_sites, s_sites) in enumerate(sites):
            with autocast():
                t_out = model_outputs(teacher, p, t_sites, NEEDS, want_logits=True)
                s_out = model_outputs(student, p, s_sites, NEEDS, want_logits=True)
                if e == 0:  # the base runs do not depend on the entry
                    t_base, s_base, _ = _top1_and_kl(t_out, s_out, counterfactual=False)
                    np.add.at(base, rows, np.stack([np.ones(len(rows)), (t_base == s_base).numpy()], 1))
                t_cf, s_cf, kl = _top1_and_kl(t_out, s_out, counterfactual=True)
            hits = (t_cf == s_cf).numpy()
            changed = (t_cf != t_base).numpy()
            np.add.at(counts[:, e], rows, np.stack([np.ones(len(rows)), hits, changed, hits & changed,
                                                    kl.numpy()], 1))
            np.add.at(hist[e, 0], t_cf.numpy()[changed], 1)
            np.add.at(hist[e, 1], s_cf.numpy()[changed], 1)
            bar.update(1)
    bar.close()
    return {"base": base, "entries": counts, "top1": hist}


def _ratio(num, den):
    return num / den if den > 0 else float("nan")


def _ci(stat, n_boot: int, seed: int, n_pairs: int):
    """Percentile 95% interval of `stat(weights)` over bootstrap resamples of the pairs (weights (B, n))."""
    rng = np.random.default_rng([seed, 2])
    weights = rng.multinomial(n_pairs, np.full(n_pairs, 1.0 / n_pairs), size=n_boot).astype(float)
    values = stat(weights)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return [None, None]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def _metric(num, den, n_boot, seed):
    """Point value sum(num)/sum(den) over pairs, and its bootstrap interval. num, den: (n_pairs,)."""
    value = _ratio(num.sum(), den.sum())
    lo_hi = _ci(lambda w: (w @ num) / np.where(w @ den > 0, w @ den, np.nan), n_boot, seed, len(num))
    return {"value": None if math.isnan(value) else float(value), "ci95": lo_hi}


def summarize(counts: dict, entries: list[MappingEntry], n_boot: int = 1000, seed: int = 0) -> dict:
    """IIA, effective IIA, changed share, KL and chance per entry and over all entries pooled."""
    f = {name: i for i, name in enumerate(FIELDS)}

    def block(c, hist):  # c: (n_pairs, 5) counts summed over the entries it covers
        t_freq = hist[0] / max(hist[0].sum(), 1)
        s_freq = hist[1] / max(hist[1].sum(), 1)
        return {
            "iia": _metric(c[:, f["hits"]], c[:, f["positions"]], n_boot, seed),
            "effective_iia": _metric(c[:, f["changed_hits"]], c[:, f["changed"]], n_boot, seed),
            "changed": _metric(c[:, f["changed"]], c[:, f["positions"]], n_boot, seed),
            "kl": _metric(c[:, f["kl"]], c[:, f["positions"]], n_boot, seed),
            "chance": float(t_freq @ s_freq) if hist[0].sum() else None,
            "positions": int(c[:, f["positions"]].sum()),
            "changed_positions": int(c[:, f["changed"]].sum()),
        }

    per_entry = []
    for e, entry in enumerate(entries):
        row = {"index": entry.index, "teacher_variables": list(entry.teacher_names),
               "student_variables": list(entry.student_names),
               "teacher_layers": sorted(entry.teacher), "student_layers": sorted(entry.student)}
        row.update(block(counts["entries"][:, e], counts["top1"][e]))
        per_entry.append(row)
    base = counts["base"]
    return {
        "pairs": int(base.shape[0]),
        "base_agreement": {**_metric(base[:, 1], base[:, 0], n_boot, seed), "positions": int(base[:, 0].sum())},
        "overall": block(counts["entries"].sum(1), counts["top1"].sum(0)),
        "entries": per_entry,
    }


# --- output ------------------------------------------------------------------------------------
def _fmt(m, pct=True):
    if m["value"] is None:
        return "-"
    scale, unit = (100.0, "") if pct else (1.0, "")
    lo, hi = m["ci95"]
    ci = f" [{lo * scale:.1f}, {hi * scale:.1f}]" if lo is not None else ""
    return f"{m['value'] * scale:.1f}{ci}{unit}" if pct else f"{m['value']:.3f}{ci.replace('.1f', '.3f')}"


def format_table(summary: dict) -> str:
    """A markdown table (percentages, 95% intervals in brackets)."""
    lines = ["| mapping entry | teacher variables | student variables | IIA % | effective IIA % | changed % "
             "| chance % | KL (nats) |", "|---|---|---|---|---|---|---|---|"]
    rows = [(str(r["index"]), " ".join(r["teacher_variables"]), " ".join(r["student_variables"]), r)
            for r in summary["entries"]]
    rows.append(("all entries", "", "", summary["overall"]))
    for name, tv, sv, r in rows:
        kl = r["kl"]
        kl_text = "-" if kl["value"] is None else f"{kl['value']:.3f}" + (
            f" [{kl['ci95'][0]:.3f}, {kl['ci95'][1]:.3f}]" if kl["ci95"][0] is not None else "")
        chance = "-" if r["chance"] is None else f"{100 * r['chance']:.1f}"
        lines.append(f"| {name} | `{tv}` | `{sv}` | {_fmt(r['iia'])} | {_fmt(r['effective_iia'])} | "
                     f"{_fmt(r['changed'])} | {chance} | {kl_text} |".replace("``", ""))
    b = summary["base_agreement"]
    lines.append(f"\nbase agreement (no intervention): {_fmt(b)} % over {b['positions']} positions; "
                 f"{summary['pairs']} pairs")
    return "\n".join(lines)


def sweep_grid(summary: dict, key: str = "iia") -> tuple[list[int], list[int], np.ndarray]:
    """(teacher layers, student layers, values (T, S)) of a sweep's entries."""
    entries = summary["entries"]
    t_layers = sorted({r["teacher_layers"][0] for r in entries})
    s_layers = sorted({r["student_layers"][0] for r in entries})
    grid = np.full((len(t_layers), len(s_layers)), np.nan)
    for r in entries:
        value = r[key]["value"]
        grid[t_layers.index(r["teacher_layers"][0]), s_layers.index(r["student_layers"][0])] = \
            np.nan if value is None else value
    return t_layers, s_layers, grid


def draw_heatmaps(panels: list[tuple[str, dict]], path: Path, keys=("iia", "effective_iia")) -> None:
    """One heatmap per (title, sweep summary) and key, side by side: teacher block x student block, values in cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"iia": "IIA", "effective_iia": "effective IIA"}
    cells = [(title, key, *sweep_grid(summary, key)) for title, summary in panels for key in keys]
    fig, axes = plt.subplots(1, len(cells), figsize=(2.2 + 1.1 * sum(len(c[3]) for c in cells) + 1.2 * len(cells),
                                                     1.6 + 0.55 * max(len(c[2]) for c in cells)), squeeze=False)
    for ax, (title, key, t_layers, s_layers, grid) in zip(axes[0], cells):
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                text = "-" if np.isnan(grid[i, j]) else f"{grid[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="black" if not np.isnan(grid[i, j]) and grid[i, j] > 0.6 else "white")
        ax.set_xticks(range(len(s_layers)), [str(s) for s in s_layers])
        ax.set_yticks(range(len(t_layers)), [str(t) for t in t_layers])
        ax.set_xlabel("student block (output)")
        ax.set_ylabel("teacher block (output)")
        ax.set_title(f"{title}\n{names.get(key, key)}" if title else names.get(key, key), fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


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
    tok, special = load_tokenizer(args.tokenizer_name or args.teacher_name, vocab, mlm, args.cache_dir)

    entries: list[MappingEntry] = []
    if args.neuron_mapping:
        entries = load_neuron_mapping(args.neuron_mapping, model_shape(teacher), model_shape(student))
    sweep = sweep_entries(teacher, student) if args.sweep else []

    positions = [getattr(m.config, "max_position_embeddings", None) or m.config.n_positions for m in (teacher, student)]
    positions = [n - 2 if m.config.model_type == "roberta" else n for n, m in zip(positions, (teacher, student))]
    max_len = min(positions + ([args.max_seq_length] if args.max_seq_length else []))
    dataset = load_dataset(args.data_file, tok, special, max_len, args.seed)
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
