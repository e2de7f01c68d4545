"""The quickstart report's plots: test perplexity, learning curves, the ablation, training losses and IIA heatmaps."""
from __future__ import annotations

import json
import math
from pathlib import Path

from pipelines.quickstart.stats import mean_std

COLORS = {"standard": "tab:blue", "diito": "tab:orange", "standard_eqc": "tab:green", "seed_standard": "tab:purple",
          "ctl_weight": "tab:brown", "ctl_source_kd": "tab:pink", "ctl_misaligned": "tab:olive",
          "student_init": "0.45", "teacher": "0.15"}


def read_loss_curves(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """The `losses/<name>` scalars causal_train.py wrote under `<dump_path>/log/train`."""
    import logging

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one "No path found after" line per file
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag.split("/", 1)[1]: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags().get("scalars", []) if tag.startswith("losses/")}


def teacher_loss_curve(teacher_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of a teacher's training, from its trainer_state.json."""
    log = json.loads((teacher_dir / "trainer_state.json").read_text()).get("log_history", [])
    return [(e["step"], e["loss"]) for e in log if "loss" in e]


def _save(fig, path: Path, plt) -> None:
    from atomic_files import atomic_open

    fig.tight_layout()
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def plot_losses(path: Path, out: Path, runs: dict, main_arms: list[str], labels: dict, lm: str, first_seed: int,
                plt) -> None:
    """The first teacher's loss and one panel per student loss: one line per main run (first teacher)."""
    names = {n: r for n, r in runs.items() if r["objective"] in main_arms and r["teacher"] == 1}
    curves = {n: read_loss_curves(Path(r["folder"]) / "log" / "train") for n, r in names.items()}
    losses = [n for n in ("loss", "ce", lm, "cos", "causal_ce") if any(n in c for c in curves.values())]
    teacher = teacher_loss_curve(out / "teacher")
    panels = len(losses) + 1
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.5 * nrows), squeeze=False)
    axes = [ax for row in axes for ax in row]
    for ax in axes[panels:]:
        ax.set_visible(False)
    axes[0].plot([s for s, _ in teacher], [v for _, v in teacher], color="black")
    axes[0].set_title(f"teacher: {lm.upper()} loss", fontsize=10)
    axes[0].set_ylabel("cross-entropy (nats)")
    ylabels = {"loss": "weighted sum of the losses", "ce": "KL x T^2 (nats)", lm: "cross-entropy (nats)",
               "cos": "1 - cosine", "causal_ce": "KL x T^2 (nats)"}
    for ax, loss in zip(axes[1:], losses):
        for name, curve in sorted(curves.items()):
            if loss in curve:
                arm = names[name]["objective"]
                ax.plot(*zip(*curve[loss]), color=COLORS.get(arm, "tab:gray"), alpha=0.8, lw=1,
                        label=labels[arm] if names[name]["seed"] == first_seed else None)
        ax.set_title(f"students: {loss}", fontsize=9)
        ax.set_ylabel(ylabels.get(loss, loss))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes[:panels]:
        ax.set_xlabel("step")
    fig.suptitle("training losses (students: one line per seed, first teacher)")
    _save(fig, path, plt)


def plot_perplexity(path: Path, rows: list[tuple[str, str, list[float]]], init: float, teacher: float,
                    random_ppl: float, vocab: int, what: str, plt) -> None:
    """Held-out perplexity of each row (key, label, values): mean ± std and the runs; the teacher and the student
    at initialisation as lines; the random student off the scale, named in the title."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for x, (key, label, values) in enumerate(rows):
        mean, std = mean_std(values)
        color = COLORS.get(key, "tab:gray")
        ax.errorbar([x], [mean], yerr=[std or 0.0], fmt="D", color=color, capsize=6, ms=8)
        ax.scatter([x + 0.12] * len(values), values, color=color, s=14, alpha=0.7)
        ax.annotate(f"{mean:.1f}", (x, mean), textcoords="offset points", xytext=(-14, 9), fontsize=8)
    ax.axhline(init, color=COLORS["student_init"], ls="--", lw=1, label=f"student at initialisation ({init:.1f})")
    ax.axhline(teacher, color=COLORS["teacher"], ls="-", lw=1, label=f"teacher ({teacher:.1f})")
    ax.set_xticks(range(len(rows)), [label.replace(", ", ",\n").replace(" (", "\n(") for _, label, _ in rows],
                  fontsize=7)
    ax.set_xlim(-0.5, len(rows) - 0.5)
    ax.set_ylabel("test perplexity (lower is better)")
    note = "" if ax.get_ylim()[0] <= 0 else f"; y from {ax.get_ylim()[0]:.0f}"
    ax.set_title(f"test {what} perplexity (chance: {vocab}; random student: {random_ppl:.0f}, off the scale)\n"
                 f"large marker: mean ± std; dots: runs{note}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path, plt)


def plot_curves(path: Path, curves: dict, labels: dict, plt) -> None:
    """Test perplexity and effective IIA against training compute: one line per arm (`curves[arm]`: (TFLOP, mean
    perplexity, mean effective IIA or None) per point, first teacher, mean over seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for arm, points in curves.items():
        kw = {"color": COLORS.get(arm, "tab:gray"), "marker": "o", "ms": 3, "lw": 1.2, "label": labels[arm]}
        axes[0].plot([x for x, _, _ in points], [y for _, y, _ in points], **kw)
        eff = [(x, 100 * e) for x, _, e in points if e is not None]
        if eff:
            axes[1].plot(*zip(*eff), **kw)
    axes[0].set_ylabel("test perplexity (lower is better)")
    axes[1].set_ylabel("effective IIA % (higher is better)")
    for ax in axes:
        ax.set_xlabel("training compute (TFLOP, counted)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("learning curves (first teacher, mean over seeds; each point a snapshot of the runs)", fontsize=10)
    _save(fig, path, plt)


def plot_ablation(path: Path, rows: list[tuple[str, list[float]]], init: float, teacher: float | None, plt) -> None:
    """One line per ablation row (label, per-seed validation perplexities): the seeds and their mean, against the
    initialisation (and the teacher, when given)."""
    fig, ax = plt.subplots(figsize=(8.0, 0.45 * len(rows) + 1.6))
    if not rows:
        ax.text(0.5, 0.5, "ablation not run", ha="center", va="center")
        ax.set_axis_off()
        _save(fig, path, plt)
        return
    for y, (label, values) in enumerate(rows):
        mean, std = mean_std(values)
        color = "tab:green" if mean < init else "tab:red"
        ax.errorbar([mean], [y], xerr=[std or 0.0], fmt="D", color=color, capsize=4, ms=6)
        ax.scatter(values, [y] * len(values), color=color, s=10, alpha=0.6)
    ax.axvline(init, color=COLORS["student_init"], ls="--", lw=1, label=f"student at initialisation ({init:.1f})")
    if teacher is not None:
        ax.axvline(teacher, color=COLORS["teacher"], lw=1, label=f"teacher ({teacher:.1f})")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("validation perplexity (lower is better); green: mean below the initialisation")
    ax.set_title("ablation: one objective per row, seeds as dots (first teacher)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path, plt)
