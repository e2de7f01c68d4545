"""The quickstart's report, both families: `report.md`, `report_table.md`, `summary.json` and the plots.

It answers three questions at the quickstart's scale, on the test part, each against its controls:

1. Does distillation improve on the student it starts from? Every arm is read as a change from the
   student at initialisation (extracted from the teacher's blocks, not trained), with a 95%
   interval; a random student of the same shape is the floor.
2. Is DIITO better than standard distillation, at equal steps and at equal compute (FLOPs counted
   per step), in test perplexity and in effective IIA (the alignment figure that counts only the
   positions where the intervention changed the teacher's prediction)?
3. Is the intervention what helps? DIITO against its controls: the same weight on the soft targets,
   the same extra source sequences without the interchange, and a misaligned mapping.

Every comparison is two-sided and noise-aware (`pipelines.quickstart.stats`): over teachers,
Holm-corrected over the report's comparisons, and "no clear difference" unless it is significant and
beyond the seeds' spread. With one teacher nothing is decided: the report gives that teacher's figures
over its seeds, and says a verdict needs several teachers. The tuning and the ablation are read on the
validation part, which decides the learning rate and DIITO's weight; they are not claims and are not in
the correction.
"""
from __future__ import annotations

import functools
import json
import math
import os
import platform
import struct
from pathlib import Path

from pipelines.quickstart.arms import CONTROL_NAMES, CONTROLS, init_name, key_text, learning_rate, run_name, teacher_name
from pipelines.quickstart.downstream import TOKEN_TASKS
from pipelines.quickstart.report_text import report_markdown
from pipelines.quickstart.stats import (NO_VERDICT, TEST_NAME, Comparison, against_reference, compare, holm, mean_std,
                                       plus_minus)
from pipelines.stages import format_seconds
from atomic_files import atomic_write_text

MAIN_ROWS = ("standard", "diito", "standard_eqc", "seed_standard", *CONTROLS, "standard_low", "diito_low")
METRICS = {"perplexity": True, "effective_iia": False}  # metric: lower is better
AGAINST = ("standard", "standard_eqc", *CONTROLS)  # what DIITO is compared with


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in `model.safetensors` (read from its header; tied weights are stored once)."""
    with open(model_dir / "model.safetensors", "rb") as fh:
        header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _pct(values) -> list[float]:
    return [100 * v for v in values]


def _cell(values, fmt: str = "{:.2f}") -> str:
    """`mean ± std`, or '-' when there is no value (effective IIA when no intervention changed the teacher)."""
    values = list(values)
    return plus_minus(values, fmt) if values else "-"


class Results:
    """Every number of a finished quickstart, by arm and by (teacher, seed), and the report's comparisons."""

    def __init__(self, q, stages: dict, runs: dict, evals: dict, alignment: dict, downstream: dict | None = None):
        self.q = q
        self.teachers = list(range(1, q.n_teachers + 1))
        self.arms = {name: arm for name, arm in q.arms.items() if any(r["objective"] == name for r in runs.values())}
        self.keys = {name: sorted((r["teacher"], r["seed"]) for r in runs.values() if r["objective"] == name)
                     for name in self.arms}
        self.runs = runs

        def by_key(source, arm, field, suffix=""):
            return {key: source[run_name(arm, *key) + suffix][field] for key in self.keys[arm]
                    if run_name(arm, *key) + suffix in source
                    and source[run_name(arm, *key) + suffix].get(field) is not None}

        self.ppl = {a: by_key(evals, a, "perplexity") for a in self.arms}  # test (main), validation (others)
        self.iia = {a: by_key(alignment, a, "iia") for a in self.arms}
        self.eff = {a: by_key(alignment, a, "effective_iia") for a in self.arms}
        self.base = {a: by_key(alignment, a, "base_agreement") for a in self.arms}
        self.untrained = {a: {f: by_key(alignment, a, f, "@misaligned") for f in ("iia", "effective_iia")}
                          for a in self.arms}
        self.seconds = {a: by_key(runs, a, "train_seconds") for a in self.arms}
        self.steps = {a: runs[run_name(a, *self.keys[a][0])]["steps"] for a in self.arms}
        self.teacher_ppl = {k: evals[teacher_name(k)]["perplexity"] for k in self.teachers}
        self.ref = {}  # init / random: {field: {teacher: value}}
        for ref, names in (("init", {k: init_name(k) for k in self.teachers}), ("random", {1: "random_student"})):
            self.ref[ref] = {"perplexity": {k: evals[n]["perplexity"] for k, n in names.items()}}
            for field in ("iia", "effective_iia", "base_agreement", "iia_ci95"):
                self.ref[ref][field] = {k: alignment[n][field] for k, n in names.items()}
            for field in ("iia", "effective_iia"):
                self.ref[ref][f"untrained_{field}"] = {k: alignment[f"{n}@misaligned"][field]
                                                       for k, n in names.items() if f"{n}@misaligned" in alignment}
        validation = evals.get(f"{init_name(1)}@validation")
        self.init_validation = validation["perplexity"] if validation else None
        self.curves = self._curves(evals, alignment, stages.get("flops") or {})
        self._downstream(stages.get("tasks") or {}, downstream or {})
        self.comparisons = holm({k: c for k, c in self._comparisons().items() if c is not None})

    def _downstream(self, tasks: dict, downstream: dict) -> None:
        """Downstream accuracy (test part of each task) by arm and (teacher, seed); the references (teachers,
        initialisations, the random student) fine-tuned with each seed, keyed the same way."""
        self.tasks = [t for t in tasks.get("tasks", []) if any(k.startswith(f"{t}/") for k in downstream)]
        self.task_balance = tasks.get("balance", {})
        self.down = {t: {} for t in self.tasks}
        self.ref_down = {t: {} for t in self.tasks}
        for t in self.tasks:
            def acc(name, seed):
                rec = downstream.get(f"{t}/{name}_ft{seed}")
                return rec["accuracy"] if rec else None

            for a in self.arms:
                found = {key: acc(run_name(a, *key), key[1]) for key in self.keys[a]}
                self.down[t][a] = {k: v for k, v in found.items() if v is not None}
            refs = {"teacher": teacher_name, "init": init_name, "random": lambda k: "random_student"}
            for ref, name_of in refs.items():
                found = {(k, s): acc(name_of(k), s) for k in (self.teachers if ref != "random" else [1])
                         for s in self.q.seeds}
                self.ref_down[t][ref] = {k: v for k, v in found.items() if v is not None}

    def values(self, arm: str, metric: str) -> dict:
        if metric.startswith("task:"):
            return self.down[metric[5:]].get(arm, {})
        return self.ppl[arm] if metric == "perplexity" else self.eff[arm] if metric == "effective_iia" else \
            self.iia[arm]

    def room(self, task: str) -> tuple[float, float] | None:
        """(the fine-tuned teacher's mean accuracy minus the fine-tuned random student's, the larger of their spreads
        over seeds) on `task`; None without both references."""
        teacher, random = list(self.ref_down[task]["teacher"].values()), list(self.ref_down[task]["random"].values())
        if not teacher or not random:
            return None
        (t_mean, t_sd), (r_mean, r_sd) = mean_std(teacher), mean_std(random)
        return t_mean - r_mean, max((sd for sd in (t_sd, r_sd) if sd is not None), default=0.0)

    def has_room(self, task: str) -> bool:
        """Whether `task` can tell models apart here: the teacher beats the random student by more than their spread
        (`room`). Read off the references alone, never off the arms compared, so the rule cannot favour one arm; a
        task without room is reported but kept out of the verdicts and Holm's family (it would only dilute them)."""
        room = self.room(task)
        return room is not None and room[0] > room[1]

    def metrics(self) -> dict:
        """The comparisons' metrics (name: lower is better): perplexity, effective IIA, each downstream task with
        room (`has_room`)."""
        return {**METRICS, **{f"task:{t}": False for t in self.tasks if self.has_room(t)}}

    def vs_init(self, arm: str, metric: str) -> Comparison | None:
        data = self.values(arm, metric)
        if metric.startswith("task:"):  # the initialisation fine-tuned with the same seed: paired by (teacher, seed)
            init = self.ref_down[metric[5:]]["init"]
            return compare(data, init, False) if data and all(k in init for k in data) else None
        init = self.ref["init"][metric]
        if not data or any(init.get(k[0]) is None for k in data):
            return None
        return against_reference(data, init, METRICS.get(metric, False))

    def between(self, a: str, b: str, metric: str) -> Comparison | None:
        data_a, data_b = self.values(a, metric), self.values(b, metric)
        if not data_a or any(k not in data_b for k in data_a):
            return None
        return compare(data_a, data_b, self.metrics()[metric])

    def _comparisons(self) -> dict:
        """The report's family of comparisons (Holm-corrected together), by name `arm|metric` or
        `diito-other|metric` or `diito-standard|untrained`."""
        out = {}
        for arm in MAIN_ROWS:
            if arm in self.arms:
                for metric in self.metrics():
                    out[f"{arm}|{metric}"] = self.vs_init(arm, metric)
        if "diito" in self.arms:
            for other in AGAINST:
                if other in self.arms:
                    for metric in self.metrics():
                        out[f"diito-{other}|{metric}"] = self.between("diito", other, metric)
            if "standard" in self.arms:
                a, b = self.untrained["diito"]["effective_iia"], self.untrained["standard"]["effective_iia"]
                out["diito-standard|untrained"] = compare(a, b, False) if a and all(k in b for k in a) else None
        if {"diito_low", "standard_low", "diito", "standard"} <= set(self.arms):
            for metric, lower in self.metrics().items():
                out[f"diito_low-standard_low|{metric}"] = self.between("diito_low", "standard_low", metric)
                out[f"low_vs_full|{metric}"] = self.gap_change(metric, lower)
        return out

    def gap_change(self, metric: str, lower_is_better: bool) -> Comparison | None:
        """DIITO's advantage over standard distillation with little data against the same with all of it: per
        (teacher, seed), (diito_low - standard_low) - (diito - standard). "better": DIITO gains more with less data."""
        low = {k: v - self.values("standard_low", metric)[k] for k, v in self.values("diito_low", metric).items()
               if k in self.values("standard_low", metric)}
        full = {k: v - self.values("standard", metric)[k] for k, v in self.values("diito", metric).items()
                if k in self.values("standard", metric)}
        if not low or any(k not in full for k in low):
            return None
        return compare(low, full, lower_is_better)

    def get(self, name: str) -> Comparison | None:
        return self.comparisons.get(name)

    def _curves(self, evals: dict, alignment: dict, flops: dict) -> dict:
        """{arm: [(TFLOP, mean test perplexity, mean effective IIA or None, step)]} of the first teacher's runs."""
        curves = {}
        for arm in MAIN_ROWS:
            if arm not in self.arms or arm not in flops:
                continue
            names = [run_name(arm, 1, seed) for (k, seed) in self.keys[arm] if k == 1]
            steps = sorted({int(n.rsplit("_step", 1)[1]) for n in evals for base in names
                            if n.startswith(base + "_step")} | {self.steps[arm]})
            points = []
            for step in steps:
                suffix = "" if step == self.steps[arm] else f"_step{step}"
                ppl = [evals[n + suffix]["perplexity"] for n in names if n + suffix in evals]
                eff = [alignment[n + suffix]["effective_iia"] for n in names
                       if n + suffix in alignment and alignment[n + suffix]["effective_iia"] is not None]
                if ppl:
                    points.append((flops[arm] * step / 1e12, sum(ppl) / len(ppl), sum(eff) / len(eff) if eff else None,
                                   step))
            curves[arm] = points
        return curves


def _ref_cell(values: dict, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    vals = [scale * v for v in values.values() if v is not None]
    return plus_minus(vals, fmt) if vals else "-"


def _change(c: Comparison | None, fmt: str = "{:+.2f}", scale: float = 1.0, missing: str = "-") -> str:
    return missing if c is None else c.interval(fmt, scale)


def results_table(r: Results, params: dict, flops: dict) -> str:
    """The main table (test part): the teacher, the student at initialisation, the random student, then each main arm
    and control; effective IIA first among the alignment figures."""
    p, q = r.q.preset, r.q
    n_t = len(r.teachers)
    rows = [
        "| model | layers x width | parameters | test perplexity | per run | change from initialisation [95% CI] "
        "| effective IIA % | change (points) [95% CI] | IIA % | base agreement % | training steps "
        "| training compute (TFLOP) | training time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {q.labels['teacher']} | {p.teacher_layers} x {p.hidden} | {params['teacher'] / 1e6:.2f} M | "
        f"{_ref_cell(r.teacher_ppl)} | {'one teacher' if n_t == 1 else ', '.join(f'{v:.2f}' for v in r.teacher_ppl.values())} "
        f"| - | - | - | - | - | {q.teacher_steps} | - | {q.teacher_time} |",
    ]
    for ref, label in (("init", "student at initialisation (no distillation)"),
                       ("random", "random student of the same shape")):
        d = r.ref[ref]
        per = ", ".join(f"{v:.2f}" for v in d["perplexity"].values()) if len(d["perplexity"]) > 1 else "-"
        rows.append(f"| {label} | {p.student_layers} x {p.hidden} | {params['student'] / 1e6:.2f} M | "
                    f"{_ref_cell(d['perplexity'])} | {per} | - | {_ref_cell(d['effective_iia'], '{:.1f}', 100)} | - | "
                    f"{_ref_cell(d['iia'], '{:.1f}', 100)} | {_ref_cell(d['base_agreement'], '{:.1f}', 100)} "
                    f"| 0 | - | - |")
    for arm in MAIN_ROWS:
        if arm not in r.arms:
            continue
        per_step = flops.get(arm)
        compute = f"{per_step * r.steps[arm] / 1e12:.3g} per run" if per_step else "-"
        ppl = list(r.ppl[arm].values())
        rows.append(
            f"| {q.labels[arm]} | {p.student_layers} x {p.hidden} | {params['student'] / 1e6:.2f} M | "
            f"{plus_minus(ppl)} | {', '.join(f'{v:.2f}' for v in ppl)} | {_change(r.get(f'{arm}|perplexity'))} | "
            f"{_cell(_pct(r.eff[arm].values()), '{:.1f}')} | {_change(r.get(f'{arm}|effective_iia'), '{:+.1f}', 100)} | "
            f"{_cell(_pct(r.iia[arm].values()), '{:.1f}')} | {_cell(_pct(r.base[arm].values()), '{:.1f}')} | "
            f"{r.steps[arm]} per run | {compute} | {plus_minus(r.seconds[arm].values(), '{:.0f}')} s per run |")
    return "\n".join(rows) + "\n"


def diito_table(r: Results) -> str:
    """DIITO against standard distillation (equal steps, equal compute) and its controls: each difference, its
    interval, the verdict (p, Holm) and the per-seed view."""
    q = r.q
    rows = ["| DIITO against | test perplexity: DIITO minus it [95% CI] | verdict | effective IIA (points) [95% CI] "
            "| verdict | per-seed view (perplexity; effective IIA) |", "|---|---|---|---|---|---|"]
    for other in AGAINST:
        cp, ce = r.get(f"diito-{other}|perplexity"), r.get(f"diito-{other}|effective_iia")
        if cp is None:
            continue
        rows.append(f"| {q.labels[other]} | {cp.interval()} | {_words(cp)} | {_change(ce, '{:+.1f}', 100)} | "
                    f"{_words(ce)} | {cp.per_seed()}; {ce.per_seed() if ce else '-'} |")
    low = q.preset.low_resource
    low_rows = () if low is None else (
        ("diito_low-standard_low", f"{q.labels['standard_low']} (DIITO with the same data)"),
        ("low_vs_full", f"(its advantage with {low:g} of the data minus with all of it)"))
    for name, label in low_rows:  # only with the low-resource arms (a preset's `low_resource`)
        cp, ce = r.get(f"{name}|perplexity"), r.get(f"{name}|effective_iia")
        if cp is not None:
            rows.append(f"| {label} | {cp.interval()} | {_words(cp)} | {_change(ce, '{:+.1f}', 100)} | "
                        f"{_words(ce)} | {cp.per_seed()}; {ce.per_seed() if ce else '-'} |")
    return "\n".join(rows) + "\n"


def _words(c: Comparison | None) -> str:
    if c is None:
        return "-"
    head = {"better": "DIITO better", "worse": "DIITO worse", "no clear difference": "no clear difference"}
    text = f"{head[c.outcome]} ({c.evidence()})"
    return text if c.result != NO_VERDICT else f"{NO_VERDICT}; its seeds: {text}"


def downstream_table(r: Results) -> str:
    """Downstream accuracy on each task's test part: the references, then each main arm and control, each arm's
    change from the initialisation fine-tuned with the same seed, and DIITO against standard distillation."""
    if not r.tasks:
        return ""
    q = r.q
    head = "| model | " + " | ".join(f"{t}: accuracy % | change from initialisation [95% CI]" for t in r.tasks) + " |"
    rows = [head, "|---|" + "---|---|" * len(r.tasks)]
    for ref, label in (("teacher", q.labels["teacher"]), ("init", "student at initialisation (no distillation)"),
                       ("random", "random student of the same shape")):
        rows.append(f"| {label} | " + " | ".join(f"{_ref_cell(r.ref_down[t][ref], '{:.1f}', 100)} | -"
                                                 for t in r.tasks) + " |")
    for arm in MAIN_ROWS:
        if arm in r.arms and any(r.down[t].get(arm) for t in r.tasks):
            rows.append(f"| {q.labels[arm]} | " + " | ".join(
                f"{_cell(_pct(r.down[t][arm].values()), '{:.1f}')} | {_change(r.get(f'{arm}|task:{t}'), '{:+.1f}', 100)}"
                for t in r.tasks) + " |")
    for other in AGAINST:
        cells = [r.get(f"diito-{other}|task:{t}") for t in r.tasks]
        if any(cells):
            rows.append(f"| DIITO minus {q.labels[other]} | " + " | ".join(
                f"{_change(c, '{:+.1f}', 100)} | {_words(c)}" for c in cells) + " |")
    return "\n".join(rows) + "\n"


def downstream_notes(r: Results) -> str:
    """What each task's accuracy is read against: its majority-class baseline, and the room between the random
    student and the teacher (little room: the task cannot tell the students apart)."""
    notes = []
    for t in r.tasks:
        test = r.task_balance.get(t, {}).get("test", {})
        gap = r.room(t)
        room = f"; room between the random student and the teacher {100 * gap[0]:+.1f} points" if gap else ""
        room += ("" if r.has_room(t) else ": **no room** (the teacher does not beat the random student beyond their "
                 "spread over seeds), so this task is reported but kept out of the verdict and the correction")
        words = f" ({test['labels']} words)" if t in TOKEN_TASKS and test.get("labels") else ""
        notes.append(f"- `{t}`: {test.get('examples', '?')} test examples{words}, majority-class baseline "
                     f"{100 * (test.get('majority_accuracy') or 0):.1f}%{room}.")
    return "\n".join(notes) + "\n"


def curves_table(r: Results) -> str:
    """The learning curves: each arm's mean test perplexity and effective IIA at each evaluated point."""
    q = r.q
    rows = ["| arm | step | training compute (TFLOP) | test perplexity | effective IIA % |", "|---|---|---|---|---|"]
    for arm, points in r.curves.items():
        for tflop, ppl, eff, step in points:
            rows.append(f"| {q.labels[arm]} | {step} | {tflop:.3g} | {ppl:.2f} | "
                        f"{'-' if eff is None else f'{100 * eff:.1f}'} |")
    return "\n".join(rows) + "\n"


def untrained_table(r: Results) -> str:
    """IIA at DIITO's sites and at the misaligned sites (which only the misaligned control trained on)."""
    q = r.q
    rows = ["| model | effective IIA %, DIITO's sites | IIA % | effective IIA %, misaligned sites | IIA % |",
            "|---|---|---|---|---|"]
    init = r.ref["init"]
    rows.append(f"| student at initialisation | {_ref_cell(init['effective_iia'], '{:.1f}', 100)} | "
                f"{_ref_cell(init['iia'], '{:.1f}', 100)} | {_ref_cell(init.get('untrained_effective_iia', {}), '{:.1f}', 100)} "
                f"| {_ref_cell(init.get('untrained_iia', {}), '{:.1f}', 100)} |")
    for arm in ("standard", "diito", "ctl_misaligned"):
        if arm in r.arms:
            u = r.untrained[arm]
            rows.append(f"| {q.labels[arm]} | {_cell(_pct(r.eff[arm].values()), '{:.1f}')} | "
                        f"{_cell(_pct(r.iia[arm].values()), '{:.1f}')} | {_cell(_pct(u['effective_iia'].values()), '{:.1f}')} "
                        f"| {_cell(_pct(u['iia'].values()), '{:.1f}')} |")
    return "\n".join(rows) + "\n"


def tuning_table(r: Results, choice: dict) -> str:
    """The tuning runs (validation part): each candidate's perplexity over the seeds and which was chosen; '' when
    the tuning was not run."""
    q = r.q
    names = [a for a in r.arms if a.startswith("tune_")]
    if not names:
        return ""
    rows = ["| candidate | learning rate | causal_ce | validation perplexity | per seed | chosen |",
            "|---|---|---|---|---|---|"]
    for a in names:
        arm = r.arms[a]
        weight = dict(arm.alphas).get("causal_ce")
        lr = learning_rate(arm, q.preset)
        chosen = lr == choice["lr"] and (weight is None or weight == choice["weight"])
        rows.append(f"| {arm.label} | {lr:g} | {'-' if weight is None else f'{weight:g}'} | "
                    f"{plus_minus(r.ppl[a].values())} | {', '.join(f'{v:.2f}' for v in r.ppl[a].values())} | "
                    f"{'yes' if chosen else ''} |")
    return "\n".join(rows) + "\n"


def ablation_table(r: Results) -> str:
    """The ablation (validation part): each objective's perplexity over the seeds (first teacher) and its change from
    the initialisation's; '' when the ablation was not run."""
    q = r.q
    names = [a for a in q.ablation_table_arms() if a in r.arms]
    if not names or r.init_validation is None:
        return ""
    rows = ["| objective | losses (weights) | learning rate | validation perplexity | per seed | change from "
            "initialisation [95% CI] | against the initialisation |", "|---|---|---|---|---|---|---|"]
    for a in names:
        arm = r.arms[a]
        first = {k: v for k, v in r.ppl[a].items() if k[0] == 1}
        c = against_reference(first, {1: r.init_validation}, True, claim=False)
        lr = learning_rate(arm, q.preset)
        rows.append(f"| {arm.label} | {arm.objective(q.lm)} | {lr:g} | {plus_minus(first.values())} | "
                    f"{', '.join(f'{v:.2f}' for v in first.values())} | {c.interval()} | {c.result} ({c.evidence()}) |")
    return "\n".join(rows) + "\n"


def one_teacher_verdict(r: Results) -> str:
    """The short verdict with one teacher: none is made (a claim about the method is a test over teachers), and
    the three lines give that teacher's differences over its seeds instead. No word in them comes from a test, so
    another teacher (another seed, another CPU kind) changes their numbers, never what they say."""

    fig = functools.partial(_change, missing="not measured")

    tasks = [t for t in r.tasks if r.has_room(t)]

    def task_figs(name: str) -> str:
        return "".join(f", {t} accuracy {fig(r.get(f'{name}|task:{t}'), '{:+.1f}', 100)} points" for t in tasks)

    head = f"{NO_VERDICT}: verdicts are tests over teachers (`--preset study`, or `--teachers 5`)"
    line1 = (f"1. Distillation: {head}; this teacher's {len(r.q.seeds)} seeds, standard distillation minus its "
             f"initialisation: test perplexity {fig(r.get('standard|perplexity'))}" + task_figs("standard") + ".")
    parts = []
    for other, setting in (("standard", "equal steps"), ("standard_eqc", "equal compute")):
        parts.append(f"at {setting}, perplexity {fig(r.get(f'diito-{other}|perplexity'))}, effective IIA "
                     f"{fig(r.get(f'diito-{other}|effective_iia'), '{:+.1f}', 100)} points" + task_figs(f"diito-{other}"))
    if r.get("low_vs_full|perplexity") is not None:
        parts.append(f"with {r.q.preset.low_resource:g} of the data, perplexity "
                     f"{fig(r.get('diito_low-standard_low|perplexity'))}, minus the same with all of it "
                     f"{fig(r.get('low_vs_full|perplexity'))}")
    line2 = f"2. DIITO against standard distillation: {NO_VERDICT}; DIITO minus standard " + "; ".join(parts) + "."
    controls = [c for c in CONTROLS if c in r.arms]
    line3 = f"3. Is the intervention the cause: {NO_VERDICT}; " + ("no control was run." if not controls else (
        f"DIITO minus {', '.join(CONTROL_NAMES[c] for c in controls)}: perplexity "
        f"{', '.join(fig(r.get(f'diito-{c}|perplexity')) for c in controls)}; effective IIA "
        f"{', '.join(fig(r.get(f'diito-{c}|effective_iia'), '{:+.1f}', 100) for c in controls)} points."))
    return "\n".join([line1, line2, line3])


def verdict(r: Results) -> str:
    """The short verdict, three lines: does distillation help; DIITO against standard at equal steps and compute;
    is the intervention the cause (DIITO against its controls). With one teacher: `one_teacher_verdict`."""
    if len(r.teachers) == 1:
        return one_teacher_verdict(r)

    def said(c: Comparison | None, better: str, worse: str, fmt="{:+.2f}", scale=1.0) -> str:
        if c is None:
            return "not measured"
        word = {"better": better, "worse": worse, "no clear difference": "no clear difference"}[c.result]
        return f"{word} ({c.interval(fmt, scale)}; {c.evidence()})"

    std = r.get("standard|perplexity")
    tasks = "".join(f"; {t} accuracy " + said(r.get(f"standard|task:{t}"), "better", "worse", "{:+.1f}", 100)
                    for t in r.tasks if r.has_room(t))
    line1 = "1. Distillation: standard distillation against its initialisation, test perplexity " + \
        said(std, "better", "worse") + tasks + "."
    parts = []
    for other, setting in (("standard", "equal steps"), ("standard_eqc", "equal compute")):
        parts.append(f"at {setting}, perplexity " + said(r.get(f"diito-{other}|perplexity"), "DIITO better",
                                                         "DIITO worse")
                     + ", effective IIA " + said(r.get(f"diito-{other}|effective_iia"), "DIITO better", "DIITO worse",
                                                 "{:+.1f}", 100)
                     + "".join(f", {t} accuracy " + said(r.get(f"diito-{other}|task:{t}"), "DIITO better",
                                                         "DIITO worse", "{:+.1f}", 100)
                               for t in r.tasks if r.has_room(t)))
    if r.get("low_vs_full|perplexity") is not None:
        parts.append(f"with {r.q.preset.low_resource:g} of the data, perplexity " + said(r.get("diito_low-standard_low|perplexity"),
                                                                     "DIITO better", "DIITO worse")
                     + ", and DIITO's advantage in perplexity with less data than with all of it: "
                     + said(r.get("low_vs_full|perplexity"), "larger", "smaller"))
    line2 = "2. DIITO against standard distillation: " + "; ".join(parts) + "."
    beats = {m: [CONTROL_NAMES[c] for c in CONTROLS
                 if (x := r.get(f"diito-{c}|{m}")) is not None and x.result == "better"] for m in METRICS}
    n = sum(1 for c in CONTROLS if c in r.arms)
    line3 = ("3. Is the intervention the cause: DIITO beats " + (", ".join(beats["effective_iia"]) or "none")
             + f" of its {n} controls in effective IIA and " + (", ".join(beats["perplexity"]) or "none")
             + " in perplexity" + (" (all three: the aligned intervention itself helps)."
                                   if len(beats["effective_iia"]) == n and n else "."))
    return "\n".join([line1, line2, line3])


def write_report(q, stages: dict, runs: dict, evals: dict, alignment: dict, downstream: dict | None = None) -> dict:
    """Write `report.md`, `report_table.md`, `summary.json` and the plots; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.quickstart import plots as qp
    from pipelines.quickstart.environment import environment
    from iia import draw_heatmaps

    out = q.out
    r = Results(q, stages, runs, evals, alignment, downstream)
    vocab = stages["tokenizer"]["vocab_size"]
    flops = stages["flops"]
    q.teacher_steps = stages["teacher"]["steps"]
    q.eval_blocks = evals["teacher"].get("eval_samples")
    q.teacher_time = ", ".join(format_seconds(stages[teacher_name(k)]["train_seconds"]) for k in r.teachers)
    params = {"teacher": count_parameters(out / "teacher"),
              "student": count_parameters(Path(runs[run_name("standard", 1, q.seeds[0])]["folder"]))}
    env = environment(q.pipe.env)
    tables = {"main": results_table(r, params, flops), "diito": diito_table(r), "curves": curves_table(r),
              "untrained": untrained_table(r), "tuning": tuning_table(r, stages["tuning"]), "ablation": ablation_table(r),
              "downstream": downstream_table(r)}
    tables["downstream_notes"] = downstream_notes(r) if r.tasks else ""
    sentence = verdict(r)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    init_mean = mean_std(list(r.ref["init"]["perplexity"].values()))[0]
    teacher_mean = mean_std(list(r.teacher_ppl.values()))[0]
    qp.plot_perplexity(plots / "heldout_perplexity.png",
                       [(a, q.labels[a], list(r.ppl[a].values())) for a in MAIN_ROWS if a in r.arms],
                       init_mean, teacher_mean, r.ref["random"]["perplexity"][1], vocab,
                       "masked-LM" if q.lm == "mlm" else "causal-LM", plt)
    qp.plot_curves(plots / "curves.png", {a: [(x, y, e) for x, y, e, _ in pts] for a, pts in r.curves.items()},
                   q.labels, plt)
    if tables["ablation"]:
        qp.plot_ablation(plots / "ablation.png",
                         [(r.arms[a].label, [v for k, v in r.ppl[a].items() if k[0] == 1])
                          for a in q.ablation_table_arms() if a in r.arms], r.init_validation, None, plt)
    qp.plot_losses(plots / "training_losses.png", out, runs, [a for a in MAIN_ROWS if a in r.arms], q.labels, q.lm,
                   q.seeds[0], plt)
    first = q.seeds[0]
    panels = [("student at initialisation", out / "iia" / "student_init")] + \
        [(f"{q.labels[a]}, seed {first}", out / "iia" / run_name(a, 1, first)) for a in ("standard", "diito")]
    draw_heatmaps([(t, json.loads((f / "iia_results.json").read_text())["sweep"]) for t, f in panels],
                  plots / "iia_heatmaps.png")

    machine, stage_rows, stage_seconds = _stage_times(q, stages, runs, evals, alignment, downstream or {})
    corpus = stages["corpus"]

    atomic_write_text(out / "report.md", report_markdown(q, r, machine, tables, sentence, corpus, vocab, flops,
                                                         stages, stage_rows, sum(stage_seconds.values()), env))
    atomic_write_text(out / "report_table.md", "\n".join(t for n, t in tables.items() if t and n != "downstream_notes"))
    summary = _summary(q, r, stages, params, flops, vocab, sentence, stage_seconds, env)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _summary(q, r: Results, stages, params, flops, vocab, sentence, stage_seconds, env) -> dict:
    n_t = len(r.teachers)

    def keyed(d):
        return {key_text(k, n_t): v for k, v in d.items()}

    def comparison(c: Comparison) -> dict:
        return {"diff": c.diff, "ci95": [c.lo, c.hi], "p": c.p, "p_holm": c.p_holm, "unit": c.unit, "n": c.n,
                "p_per_seed": c.p_seed, "pairs": c.pairs, "spread": c.spread, "result": c.result,
                "outcome": c.outcome}

    choice = {k: v for k, v in stages["tuning"].items() if k != "arms"}
    summary = {
        "preset": q.args.preset, "family": q.family, "seeds": q.seeds, "teachers": n_t, "vocab_size": vocab,
        "verdict": sentence, "test": TEST_NAME, "environment": env, "tuning": choice,
        "corpus": {k: stages["corpus"].get(k) for k in ("origin", "versions", "corpus_sha256", "train_documents",
                                                        "validation_documents", "test_documents")},
        "teacher": {"perplexity": mean_std(list(r.teacher_ppl.values()))[0],
                    "per_teacher": {str(k): v for k, v in r.teacher_ppl.items()}, "parameters": params["teacher"],
                    "train_seconds": stages["teacher"]["train_seconds"], "steps": stages["teacher"]["steps"]},
    }
    for ref, name in (("init", "student_init"), ("random", "random_student")):
        summary[name] = {field: {str(k): v for k, v in values.items()} for field, values in r.ref[ref].items()}
    summary["student_init"]["validation_perplexity"] = r.init_validation
    for a in r.arms:
        ppl = list(r.ppl[a].values())
        summary[a] = {
            "perplexity": keyed(r.ppl[a]), "mean": mean_std(ppl)[0], "std": mean_std(ppl)[1],
            "split": "test" if r.arms[a].main else "validation",
            "objective": r.arms[a].objective(q.lm), "main": r.arms[a].main,
            "learning_rate": learning_rate(r.arms[a], q.preset),
            "parameters": params["student"], "train_seconds": keyed(r.seconds[a]), "steps": r.steps[a]}
        if r.arms[a].main:
            summary[a].update({"iia": keyed(r.iia[a]), "effective_iia": keyed(r.eff[a]),
                               "base_agreement": keyed(r.base[a]),
                               "untrained_site": {f: keyed(v) for f, v in r.untrained[a].items() if v}})
    summary["comparisons"] = {name: comparison(c) for name, c in r.comparisons.items()}
    if r.tasks:
        summary["downstream"] = {t: {"balance": r.task_balance.get(t),
                                     **{ref: keyed(v) for ref, v in r.ref_down[t].items()},
                                     **{a: keyed(v) for a, v in r.down[t].items() if v}} for t in r.tasks}
    summary["curves"] = {a: [{"step": st, "tflop": x, "perplexity": y, "effective_iia": e} for x, y, e, st in pts]
                         for a, pts in r.curves.items()}
    summary["flops_per_step"] = {k: v for k, v in flops.items() if k not in ("key", "settings", "seconds", "finished",
                                                                           "files", "name")}
    summary["stage_seconds"] = stage_seconds
    return summary


def _versions() -> str:
    try:
        from importlib.metadata import version

        return f"torch {version('torch')}, transformers {version('transformers')}"
    except Exception:  # noqa: BLE001 -- versions are a courtesy
        return ""


def _stage_times(q, stages: dict, runs: dict, evals: dict, alignment: dict, downstream: dict):
    """(the machine in words, the rows of the stage-time table, the stages' seconds by name)."""
    groups = (("", stages), ("students: ", runs), ("evaluation: ", evals), ("alignment: ", alignment),
              ("downstream: ", downstream))
    stage_rows = [f"| {prefix}{k} | {format_seconds(v['seconds'])} | {v['finished']} |"
                  for prefix, records in groups for k, v in records.items() if "seconds" in v and "same_as" not in v]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
               + ("GPU preset (--n_gpu 1 --bf16)" if q.preset.gpu else f"CPU only, {q.args.threads} thread(s) per process")
               + f", Python {platform.python_version()}, {_versions()}"
               + (f"; load average {load:.1f} when the report was written" if load is not None else ""))
    stage_seconds = {k: v["seconds"] for k, v in stages.items() if "seconds" in v}
    for group, records in (("students", runs), ("eval", evals), ("iia", alignment), ("downstream", downstream)):
        stage_seconds.update({f"{group}/{k}": v["seconds"] for k, v in records.items() if "same_as" not in v})
    return machine, stage_rows, stage_seconds

