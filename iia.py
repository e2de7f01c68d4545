"""Interchange-intervention accuracy (IIA): the evaluation, its summary, its table and its heatmaps.

run_iia.py is the command line (its docstring defines the figures); the quickstart's report draws
the heatmaps too. Teacher and student run the same counterfactuals through `interventions.model_outputs`,
the function DIITO trains with, on batches prepared once (`prepare_batches`).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from batching import BatchPreparer, Prepared
from interventions import Needs, model_outputs, model_shape
from lm_seqs_dataset import LmSeqsDataset
from neuron_mapping import MappingEntry
from atomic_files import atomic_open
from utils import logger, progress_bar

NEEDS = Needs(logits=True, hidden=False, cf_logits=True, cf_hidden=False, teacher_logits=True)
FIELDS = ("positions", "hits", "changed", "changed_hits", "kl")  # per pair and entry
CHUNK = 1024  # rows projected onto the vocabulary at a time


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

    device = device or next(teacher.parameters()).device
    n_pairs = sum(int(p.input_ids.shape[0]) for p in batches)
    vocab = teacher.config.vocab_size
    base = np.zeros((n_pairs, 2))
    counts = np.zeros((n_pairs, len(entries), len(FIELDS)))
    hist = np.zeros((len(entries), 2, vocab))
    sites = [(_sites(e.teacher, device), _sites(e.student, device)) for e in entries]
    bar = progress_bar(total=len(batches) * len(entries), desc="IIA", disable=not progress, dynamic_ncols=True)
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
