"""The quickstart's report: `report.md`, `report_table.md`, `summary.json` and the plots.

It answers "is DIITO worth it?" at the quickstart's scale: held-out perplexity and causal
alignment with the teacher (IIA, `run_iia.py`) of standard distillation and DIITO at equal steps,
and of standard distillation given DIITO's training compute (steps scaled by the FLOPs counted per
step of each objective), over the same seeds.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import statistics
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import atomic_write_text  # noqa: E402

OBJECTIVES = ("standard", "diito", "standard_eqc")
LABELS = {"teacher": "teacher (BERT)", "standard": "standard distillation", "diito": "DIITO",
          "standard_eqc": "standard distillation, DIITO's compute"}
COLORS = {"standard": "tab:blue", "diito": "tab:orange", "standard_eqc": "tab:green"}


def format_seconds(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    return f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in `model.safetensors` (read from its header; tied weights are stored once)."""
    with open(model_dir / "model.safetensors", "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def read_loss_curves(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The `losses/<name>` scalars causal_train.py wrote under `<dump_path>/log/train`."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one "No path found after" line per file

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag.split("/", 1)[1]: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags().get("scalars", []) if tag.startswith("losses/")}


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def compare(a: dict[int, float], b: dict[int, float], seeds: list[int], lower_is_better: bool) -> tuple[str, int]:
    """'won' (better mean and better on every seed), 'mixed' (better mean only) or 'lost'; and the seeds won."""
    better = (lambda x, y: x < y) if lower_is_better else (lambda x, y: x > y)
    wins = sum(better(a[s], b[s]) for s in seeds)
    mean_better = better(statistics.fmean(a[s] for s in seeds), statistics.fmean(b[s] for s in seeds))
    return ("won" if mean_better and wins == len(seeds) else "mixed" if mean_better else "lost"), wins


def verdict(ppl: dict[str, dict[int, float]], iia: dict[str, dict[int, float]], seeds: list[int]) -> str:
    """Did DIITO beat standard distillation at equal steps and at equal compute, in perplexity and in IIA?"""
    n = len(seeds)
    words = {"won": "won", "mixed": "had a mixed result", "lost": "did not win"}
    parts, heads = [], []
    for other, setting in (("standard", "equal steps"), ("standard_eqc", "equal compute")):
        p_result, p_wins = compare(ppl["diito"], ppl[other], seeds, lower_is_better=True)
        i_result, i_wins = compare(iia["diito"], iia[other], seeds, lower_is_better=False)
        heads.append(f"at {setting} DIITO {words[p_result]} in perplexity and {words[i_result]} in IIA")
        parts.append(
            f"At {setting}, DIITO's mean held-out perplexity is {statistics.fmean(ppl['diito'].values()):.2f} against "
            f"{statistics.fmean(ppl[other].values()):.2f} ({LABELS[other]}; DIITO lower on {p_wins} of {n} seeds), and "
            f"its mean IIA {100 * statistics.fmean(iia['diito'].values()):.1f}% against "
            f"{100 * statistics.fmean(iia[other].values()):.1f}% (higher on {i_wins} of {n} seeds).")
    return "Against standard distillation: " + "; ".join(heads) + ". " + " ".join(parts)


def plus_minus(values, fmt="{:.2f}") -> str:
    """`mean ± std` of `values` (the mean alone for one value)."""
    mean, std = mean_std(values)
    return fmt.format(mean) + (" ± " + fmt.format(std) if std is not None else "")


def teacher_loss_curve(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of the teacher's training, from its trainer_state.json."""
    teacher_log = json.loads((out / "teacher" / "trainer_state.json").read_text()).get("log_history", [])
    return [(e["step"], e["loss"]) for e in teacher_log if "loss" in e]


def plot_student_curves(ax, curves: dict, students: dict, loss: str, seeds: list[int], colors: dict,
                        labels: dict) -> None:
    """One line per student run of the `loss` curve, coloured by objective, labelled once (first seed)."""
    for name, curve in sorted(curves.items()):
        if loss in curve:
            obj = students[name]["objective"]
            ax.plot(*zip(*curve[loss]), color=colors[obj], alpha=0.8, lw=1,
                    label=labels[obj] if students[name]["seed"] == seeds[0] else None)


def _plot_losses(out: Path, students: dict, seeds: list[int], plt) -> None:
    """One panel per loss, each with its own legend and axis labels."""
    curves = {name: read_loss_curves(out / "students" / name / "log" / "train") for name in students}
    names = [n for n in ("loss", "ce", "mlm", "cos", "causal_ce") if any(n in c for c in curves.values())]
    names += sorted({n for c in curves.values() for n in c} - set(names))
    teacher_curve = teacher_loss_curve(out)
    panels = len(names) + 1
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.5 * nrows), squeeze=False)
    axes = [ax for row in axes for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    axes[0].plot([s for s, _ in teacher_curve], [v for _, v in teacher_curve], color="black", label="teacher")
    axes[0].set_title("teacher: MLM loss (run_mlm.py)", fontsize=10)
    axes[0].set_ylabel("cross-entropy (nats)")
    axes[0].legend(fontsize=7)
    ylabels = {"loss": "weighted sum of the losses", "ce": "KL × T² (nats)", "mlm": "cross-entropy (nats)",
               "cos": "1 − cosine", "causal_ce": "KL × T² (nats)"}
    for ax, loss in zip(axes[1:], names):
        plot_student_curves(ax, curves, students, loss, seeds, COLORS, LABELS)
        title = f"students: {loss}"
        if loss == "mlm":  # the masking of training favours rare tokens (count^-0.7): a harder target
            title += "\n(rare tokens masked more often: above the held-out\nloss, ln perplexity, of uniform masking)"
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabels.get(loss, loss))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[:panels]:
        ax.set_xlabel("step")
    fig.suptitle("training losses (students: one line per seed)")
    fig.tight_layout()
    fig.savefig(out / "plots" / "training_losses.png", dpi=110)
    plt.close(fig)


def _plot_perplexity(out: Path, teacher_ppl: float, ppl: dict, seeds: list[int], vocab: int, plt) -> None:
    """A dot plot: means ± std and the seeds; the axis need not start at zero, and says so when it does not."""
    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    models = [("teacher", [teacher_ppl], "0.3")] + [(obj, [ppl[obj][s] for s in seeds], COLORS[obj])
                                                     for obj in OBJECTIVES]
    for x, (model, values, color) in enumerate(models):
        mean, std = mean_std(values)
        ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="D", color=color, capsize=6, ms=8)
        ax.scatter([x + 0.12] * len(values), values, color=color, s=14, alpha=0.7)
        ax.annotate(f"{mean:.1f}", (x, mean), textcoords="offset points", xytext=(-14, 9), fontsize=8)
    ax.set_xticks(range(len(models)), [LABELS[m].replace(", ", ",\n") for m, _, _ in models], fontsize=8)
    ax.set_xlim(-0.5, len(models) - 0.5)
    ax.set_ylabel("held-out perplexity")
    note = "" if ax.get_ylim()[0] <= 0 else f"; the y-axis starts at {ax.get_ylim()[0]:.0f}, not 0"
    ax.set_title(f"held-out masked-LM perplexity (chance: {vocab})\nlarge marker: mean ± std; dots: seeds{note}",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "plots" / "heldout_perplexity.png", dpi=110)
    plt.close(fig)


def write_report(out: Path, preset, args, stages: dict, students: dict, evals: dict, alignment: dict,
                 seeds: list[int]) -> dict:
    """Write `report.md`, `report_table.md`, `summary.json` and the plots; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from iia import draw_heatmaps

    vocab = stages["tokenizer"]["vocab_size"]
    ppl = {obj: {s: evals[f"{obj}_seed{s}"]["perplexity"] for s in seeds} for obj in OBJECTIVES}
    iia = {obj: {s: alignment[f"{obj}_seed{s}"]["iia"] for s in seeds} for obj in OBJECTIVES}
    eff = {obj: {s: alignment[f"{obj}_seed{s}"]["effective_iia"] for s in seeds} for obj in OBJECTIVES}
    train_s = {obj: [students[f"{obj}_seed{s}"]["train_seconds"] for s in seeds] for obj in OBJECTIVES}
    steps = {obj: students[f"{obj}_seed{seeds[0]}"]["steps"] for obj in OBJECTIVES}
    flops = stages["flops"]
    params = {"teacher": count_parameters(out / "teacher"),
              "student": count_parameters(out / "students" / f"standard_seed{seeds[0]}")}
    teacher_steps = stages["teacher"]["steps"]
    plots = out / "plots"

    table = _results_table(preset, stages, evals, flops, params, ppl, iia, eff, train_s, steps, seeds)
    sentence = verdict(ppl, iia, seeds)
    chance_ratio = vocab / evals["teacher"]["perplexity"]
    time_ratio = statistics.fmean(train_s["diito"]) / statistics.fmean(train_s["standard"])

    _plot_losses(out, students, seeds, plt)
    _plot_perplexity(out, evals["teacher"]["perplexity"], ppl, seeds, vocab, plt)
    first = seeds[0]
    panels = [(f"{LABELS[obj]}, seed {first}", json.loads((out / "iia" / f"{obj}_seed{first}" / "iia_results.json")
                                                          .read_text())["sweep"]) for obj in ("standard", "diito")]
    draw_heatmaps(panels, plots / "iia_heatmaps.png")

    machine, stage_rows, stage_seconds = _stage_times(preset, args, stages, students, evals, alignment)
    total = sum(stage_seconds.values())
    atomic_write_text(out / "report.md", _report_markdown(
        args, preset, machine, table, sentence, stages["corpus"], vocab, chance_ratio,
        stages["student_init"]["teacher_layers"], flops, steps, time_ratio, seeds, stage_rows, total, teacher_steps))
    atomic_write_text(out / "report_table.md", table)
    summary = {
        "preset": args.preset, "seeds": seeds, "vocab_size": vocab, "verdict": sentence,
        "teacher": {"perplexity": evals["teacher"]["perplexity"], "parameters": params["teacher"],
                    "train_seconds": stages["teacher"]["train_seconds"], "steps": teacher_steps},
        **{obj: {"perplexity": ppl[obj], "mean": mean_std(list(ppl[obj].values()))[0],
                 "std": mean_std(list(ppl[obj].values()))[1], "iia": iia[obj], "effective_iia": eff[obj],
                 "iia_ci95": {s: alignment[f"{obj}_seed{s}"]["iia_ci95"] for s in seeds},
                 "parameters": params["student"], "train_seconds": dict(zip(seeds, train_s[obj])),
                 "steps": steps[obj]} for obj in OBJECTIVES},
        "flops_per_step": {k: flops[k] for k in ("standard", "diito", "ratio")},
        "stage_seconds": stage_seconds,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _results_table(preset, stages: dict, evals: dict, flops: dict, params: dict, ppl: dict, iia: dict, eff: dict,
                   train_s: dict, steps: dict, seeds: list[int]) -> str:
    """The result table (markdown): the teacher, then each objective's students over the seeds."""
    teacher_steps = stages["teacher"]["steps"]
    rows = [
        "| model | layers x width | parameters | held-out perplexity | per seed | IIA % | effective IIA % "
        "| training steps | training compute (TFLOP) | training time |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {LABELS['teacher']} | {preset.teacher_layers} x {preset.hidden} | {params['teacher'] / 1e6:.2f} M | "
        f"{evals['teacher']['perplexity']:.2f} | one teacher | - | - | {teacher_steps} | - | "
        f"{format_seconds(stages['teacher']['train_seconds'])} |",
    ]
    for obj in OBJECTIVES:
        per_step = flops["diito" if obj == "diito" else "standard"]
        rows.append(
            f"| {LABELS[obj]} | {preset.student_layers} x {preset.hidden} | {params['student'] / 1e6:.2f} M | "
            f"{plus_minus(list(ppl[obj].values()))} | {', '.join(f'{ppl[obj][s]:.2f}' for s in seeds)} | "
            f"{plus_minus([100 * v for v in iia[obj].values()], '{:.1f}')} | "
            f"{plus_minus([100 * v for v in eff[obj].values()], '{:.1f}')} | {steps[obj]} per run | "
            f"{per_step * steps[obj] / 1e12:.3g} per run | {plus_minus(train_s[obj], '{:.0f}')} s per run |")
    return "\n".join(rows) + "\n"


def _stage_times(preset, args, stages: dict, students: dict, evals: dict, alignment: dict):
    """(the machine in words, the rows of the stage-time table, the stages' seconds by name)."""
    stage_rows = [f"| {k} | {format_seconds(v['seconds'])} | {v['finished']} |" for k, v in stages.items()]
    for group, records in (("students", students), ("evaluation", evals), ("alignment", alignment)):
        stage_rows += [f"| {group}: {k} | {format_seconds(v['seconds'])} | {v['finished']} |" for k, v in records.items()]
    try:
        from importlib.metadata import version

        versions = f"torch {version('torch')}, transformers {version('transformers')}"
    except Exception:  # noqa: BLE001 -- versions are a courtesy
        versions = ""
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
               + ("GPU preset (--n_gpu 1 --bf16)" if preset.gpu else f"CPU only, {args.threads} thread(s) per process")
               + f", Python {platform.python_version()}" + (f", {versions}" if versions else ""))
    stage_seconds = {k: v["seconds"] for k, v in stages.items()}
    for group, records in (("students", students), ("eval", evals), ("iia", alignment)):
        stage_seconds.update({f"{group}/{k}": v["seconds"] for k, v in records.items()})
    return machine, stage_rows, stage_seconds


def _report_markdown(args, preset, machine: str, table: str, sentence: str, corpus: dict, vocab: int,
                     chance_ratio: float, mapping: list[int], flops: dict, steps: dict, time_ratio: float,
                     seeds: list[int], stage_rows: list[str], total: float, teacher_steps: int) -> str:
    """The text of report.md."""
    first = seeds[0]
    return f"""# Quickstart report

{dt.date.today().isoformat()}, preset `{args.preset}`, {machine}.

## Result

{table}
{sentence}

- Held-out perplexity is `run_mlm.py --do_eval` on {corpus['heldout_documents']} held-out documents
  ({corpus['heldout_words']} words), one sequence per document truncated to {preset.max_seq_length} tokens,
  15% of tokens masked with the same `--eval_mask_seed` for every model. Chance is the vocabulary size,
  {vocab}: the teacher is {chance_ratio:.1f} times better than chance.
- IIA is `run_iia.py` on the same held-out documents with DIITO's mapping (`student_init/diito.nm`), pooled over
  its entries: the share of masked positions where the student's prediction after an interchange intervention
  (student block i's output at 30% of the positions, a consecutive span, taken from another document) equals the
  teacher's after the same intervention on teacher block {mapping} (in order). Effective IIA counts only the
  positions where the intervention changed the teacher's own prediction. Each run's bootstrap 95% interval over
  pairs is in `iia/<run>/iia_results.json`.
- Standard distillation: `--alpha_ce 0.25 --alpha_mlm 0.25 --alpha_cos 0.25`. DIITO adds `--alpha_causal_ce 0.25`
  with that mapping. All start from the same extracted student with the same seeds and batches of
  {preset.student_batch} sequences.
- Equal compute: `scripts/count_step_flops.py` counts the FLOPs of the first training steps of each objective
  (every matmul, forward and backward, by torch's FlopCounterMode): {flops['standard'] / 1e9:.3g} GFLOP per
  standard step, {flops['diito'] / 1e9:.3g} per DIITO step, a ratio of {flops['ratio']:.2f}. The third arm runs
  {steps['standard_eqc']} standard steps ({steps['diito']} x {flops['ratio']:.2f}), the compute of a DIITO run;
  its learning-rate schedule spans its own steps. Counted FLOPs, not wall time, so that the same command gives the
  same numbers (in wall time DIITO runs took {time_ratio:.1f} times as long as standard ones here).
- ± is the sample standard deviation over seeds {', '.join(map(str, seeds))} of the students. It does not cover
  what is fixed in a run: the corpus and its split, the tokenizer, the teacher and the held-out masking are the
  same for every student, so it says nothing of how the comparison moves with another teacher or tokenizer.
- The same command gives the same numbers: every stage is seeded and reproducible on the CPU (the tokenizer
  too, `scripts/deterministic_wordpiece.py`).

![held-out perplexity](plots/heldout_perplexity.png)

![alignment heatmaps](plots/iia_heatmaps.png)

Alignment of every (teacher block, student block) pair of full-width sites (`run_iia.py --sweep`), seed {first}.

![training losses](plots/training_losses.png)

## Set-up

- Corpus: {corpus['origin']}. Train part: {corpus['train_documents']} documents ({corpus['train_words']} words);
  held-out part: {corpus['heldout_documents']} documents ({corpus['heldout_words']} words); no document in both.
- Tokenizer: {vocab} entries ({'--tokenizer ' + args.tokenizer if args.tokenizer else 'WordPiece learnt on the train part'}).
- Teacher: BERT, {preset.teacher_layers} layers, hidden {preset.hidden}, {preset.heads} heads, FFN {preset.ffn},
  {teacher_steps} steps of {preset.teacher_batch} sequences, learning rate {preset.teacher_lr}.
- Students: DistilBERT, {preset.student_layers} layer(s) of the same width, initialised from teacher blocks
  {mapping} (`scripts/extract_distilbert.py --vocab_transform`), learning rate {preset.student_lr}.
- Every command is in `commands.sh`, its output in `logs/`.

## Time per stage

| stage | wall time | finished |
|---|---|---|
{chr(10).join(stage_rows)}

Sum: {format_seconds(total)} (stages skipped on a re-run keep the time of the run that did them).
"""


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] + " A module of scripts/quickstart.py, which writes the report as its "
        "last stage: run `python scripts/quickstart.py --out DIR` (finished stages are skipped).").parse_args()
    sys.exit("scripts/quickstart_report.py is not run on its own: run python scripts/quickstart.py --out DIR")
