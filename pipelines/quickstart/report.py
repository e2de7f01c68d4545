"""The quickstart's report, both families: `report.md`, `report_table.md`, `summary.json` and the plots.

It answers two questions at the quickstart's scale, each against its controls:

1. Does distillation improve on the student it starts from? Every arm is read as a change from the
   student at initialisation (extracted from the teacher's blocks, not trained), with a 95%
   interval; a random student of the same shape is the floor.
2. Is DIITO better than standard distillation, at equal steps and at equal compute (FLOPs counted
   per step), in held-out perplexity and in IIA? Two-sided and noise-aware (`pipelines.quickstart.stats`):
   "no clear difference" unless a paired t-test over seeds says p < 0.05 and the difference
   exceeds the seeds' spread.

The ablation table (each loss term alone, the seed's combination with and without smoothed MLM
masking, the default at the seed's rate) shows where the default recipe comes from.
"""
from __future__ import annotations

import json
import math
import os
import platform
import struct
from pathlib import Path

from pipelines.quickstart.arms import init_name, key_text, learning_rate, run_name, teacher_name
from pipelines.quickstart.report_text import report_markdown
from pipelines.quickstart.stats import TEST_NAME, Comparison, against_reference, compare, mean_std, plus_minus
from pipelines.stages import format_seconds
from atomic_files import atomic_write_text
MAIN_ROWS = ("standard", "diito", "standard_eqc", "seed_standard")


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
    """Every number of a finished quickstart, by arm and by (teacher, seed)."""

    def __init__(self, q, stages: dict, runs: dict, evals: dict, alignment: dict):
        self.q = q
        self.teachers = list(range(1, q.n_teachers + 1))
        self.arms = {name: arm for name, arm in q.arms.items() if any(r["objective"] == name for r in runs.values())}
        self.keys = {name: sorted((r["teacher"], r["seed"]) for r in runs.values() if r["objective"] == name)
                     for name in self.arms}

        def by_key(source, arm, field):
            return {key: source[run_name(arm, *key)][field] for key in self.keys[arm]
                    if run_name(arm, *key) in source and source[run_name(arm, *key)].get(field) is not None}

        self.ppl = {a: by_key(evals, a, "perplexity") for a in self.arms}
        self.iia = {a: by_key(alignment, a, "iia") for a in self.arms}
        self.eff = {a: by_key(alignment, a, "effective_iia") for a in self.arms}
        self.base = {a: by_key(alignment, a, "base_agreement") for a in self.arms}
        self.seconds = {a: by_key(runs, a, "train_seconds") for a in self.arms}
        self.steps = {a: runs[run_name(a, *self.keys[a][0])]["steps"] for a in self.arms}
        self.teacher_ppl = {k: evals[teacher_name(k)]["perplexity"] for k in self.teachers}
        self.ref = {}  # init / random: {field: {teacher: value}}
        for ref, names in (("init", {k: init_name(k) for k in self.teachers}), ("random", {1: "random_student"})):
            self.ref[ref] = {"perplexity": {k: evals[n]["perplexity"] for k, n in names.items()}}
            for field in ("iia", "effective_iia", "base_agreement", "iia_ci95"):
                self.ref[ref][field] = {k: alignment[n][field] for k, n in names.items()}

    def vs_init(self, arm: str, metric: str) -> Comparison:
        data, init, lower = ((self.ppl[arm], self.ref["init"]["perplexity"], True) if metric == "perplexity"
                             else (self.iia[arm], self.ref["init"]["iia"], False))
        return against_reference(data, init, lower)

    def between(self, a: str, b: str, metric: str) -> Comparison:
        data = self.ppl if metric == "perplexity" else self.iia
        return compare(data[a], data[b], metric == "perplexity")


def _ref_cell(values: dict, fmt: str = "{:.2f}", scale: float = 1.0) -> str:
    vals = [scale * v for v in values.values() if v is not None]
    return plus_minus(vals, fmt) if vals else "-"


def results_table(r: Results, params: dict, flops: dict) -> str:
    """The main table: the teacher, the student at initialisation, the random student, then each main arm."""
    p, q = r.q.preset, r.q
    n_t = len(r.teachers)
    rows = [
        "| model | layers x width | parameters | held-out perplexity | per run | change from initialisation "
        "[95% CI] | IIA % | IIA change (points) [95% CI] | effective IIA % | base agreement % | training steps "
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
                    f"{_ref_cell(d['perplexity'])} | {per} | - | {_ref_cell(d['iia'], '{:.1f}', 100)} | - | "
                    f"{_ref_cell(d['effective_iia'], '{:.1f}', 100)} | {_ref_cell(d['base_agreement'], '{:.1f}', 100)} "
                    f"| 0 | - | - |")
    for arm in MAIN_ROWS:
        if arm not in r.arms:
            continue
        per_step = flops["diito"] if arm == "diito" else flops["standard"] if arm.startswith("standard") else None
        compute = f"{per_step * r.steps[arm] / 1e12:.3g} per run" if per_step else "-"
        ppl = list(r.ppl[arm].values())
        rows.append(
            f"| {q.labels[arm]} | {p.student_layers} x {p.hidden} | {params['student'] / 1e6:.2f} M | "
            f"{plus_minus(ppl)} | {', '.join(f'{v:.2f}' for v in ppl)} | {r.vs_init(arm, 'perplexity').interval()} | "
            f"{_cell(_pct(r.iia[arm].values()), '{:.1f}')} | "
            f"{r.vs_init(arm, 'iia').interval('{:+.1f}', 100)} | {_cell(_pct(r.eff[arm].values()), '{:.1f}')} | "
            f"{_cell(_pct(r.base[arm].values()), '{:.1f}')} | {r.steps[arm]} per run | {compute} | "
            f"{plus_minus(r.seconds[arm].values(), '{:.0f}')} s per run |")
    return "\n".join(rows) + "\n"


def ablation_table(r: Results) -> str:
    """The ablation: each objective's held-out perplexity over the seeds (first teacher) and its change from the
    initialisation; '' when the ablation was not run."""
    q = r.q
    names = [a for a in q.ablation_table_arms() if a in r.arms]
    if not any(not r.arms[a].main for a in names):
        return ""
    rows = ["| objective | losses (weights) | learning rate | held-out perplexity | per seed | change from "
            "initialisation [95% CI] | against the initialisation |", "|---|---|---|---|---|---|---|"]
    for a in names:
        arm = r.arms[a]
        first = {k: v for k, v in r.ppl[a].items() if k[0] == 1}
        c = against_reference(first, r.ref["init"]["perplexity"], True)
        lr = learning_rate(arm, q.preset)
        rows.append(f"| {arm.label} | {arm.objective(q.lm)} | {lr:g} | {plus_minus(first.values())} | "
                    f"{', '.join(f'{v:.2f}' for v in first.values())} | {c.interval()} | {c.result} ({c.evidence()}) |")
    return "\n".join(rows) + "\n"


def _change_words(c: Comparison, unit_fmt: str = "{:+.2f}", scale: float = 1.0) -> str:
    words = {"better": "better", "worse": "worse", "no clear difference": "no clear difference"}
    return f"{words[c.result]} ({c.interval(unit_fmt, scale)}, {c.evidence()})"


def verdict(r: Results) -> str:
    """The verdict: each main arm against the initialisation, then DIITO against standard, two-sided."""
    q = r.q
    init = r.ref["init"]
    out = [f"Against the student at initialisation (held-out perplexity {_ref_cell(init['perplexity'])}, IIA "
           f"{_ref_cell(init['iia'], '{:.1f}', 100)}%; changes as arm minus initialisation, 95% interval over "
           f"{'teachers and ' if len(r.teachers) > 1 else ''}seeds):"]
    for arm in MAIN_ROWS:
        if arm in r.arms:
            out.append(f"{q.labels[arm]}: perplexity {_change_words(r.vs_init(arm, 'perplexity'))}, IIA "
                       f"{_change_words(r.vs_init(arm, 'iia'), '{:+.1f}', 100)} points.")
    default = r.vs_init("standard", "perplexity")
    if default.result == "better":
        out.append("The default recipe improves on the initialisation in held-out perplexity.")
    else:
        out.append(f"The default recipe does NOT improve on the initialisation in held-out perplexity "
                   f"({default.result}): distillation at this scale leaves the student no better than the teacher's "
                   f"blocks it starts from; see the ablation for which objective does.")
    parts = []
    for other, setting in (("standard", "equal steps"), ("standard_eqc", "equal compute")):
        cp, ci = r.between("diito", other, "perplexity"), r.between("diito", other, "iia")
        head = {"better": "DIITO better", "worse": "DIITO worse", "no clear difference": "no clear difference"}
        parts.append(f"at {setting} (against {q.labels[other]}): perplexity {head[cp.result]} "
                     f"(DIITO minus standard {cp.interval()}, {cp.evidence()}, DIITO lower in {cp.wins} of {cp.n}), "
                     f"IIA {head[ci.result]} ({ci.interval('{:+.1f}', 100)} points, {ci.evidence()}, "
                     f"DIITO higher in {ci.wins} of {ci.n})")
    out.append(f"DIITO against standard distillation ({TEST_NAME}; a difference counts only with p < 0.05 and "
               f"beyond the seeds' spread): " + "; ".join(parts) + ".")
    return " ".join(out)


def write_report(q, stages: dict, runs: dict, evals: dict, alignment: dict) -> dict:
    """Write `report.md`, `report_table.md`, `summary.json` and the plots; return the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.quickstart import plots as qp
    from iia import draw_heatmaps

    out = q.out
    r = Results(q, stages, runs, evals, alignment)
    vocab = stages["tokenizer"]["vocab_size"]
    flops = stages["flops"]
    q.teacher_steps = stages["teacher"]["steps"]
    q.eval_blocks = evals["teacher"].get("eval_samples")
    q.teacher_time = ", ".join(format_seconds(stages[teacher_name(k)]["train_seconds"]) for k in r.teachers)
    params = {"teacher": count_parameters(out / "teacher"),
              "student": count_parameters(out / "students" / run_name("standard", 1, q.seeds[0]))}
    table = results_table(r, params, flops)
    abl = ablation_table(r)
    sentence = verdict(r)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    init_mean = mean_std(list(r.ref["init"]["perplexity"].values()))[0]
    teacher_mean = mean_std(list(r.teacher_ppl.values()))[0]
    qp.plot_perplexity(plots / "heldout_perplexity.png",
                       [(a, q.labels[a], list(r.ppl[a].values())) for a in MAIN_ROWS if a in r.arms],
                       init_mean, teacher_mean, r.ref["random"]["perplexity"][1], vocab,
                       "masked-LM" if q.lm == "mlm" else "causal-LM", plt)
    qp.plot_ablation(plots / "ablation.png",
                     [(r.arms[a].label,
                       [v for k, v in r.ppl[a].items() if k[0] == 1])
                      for a in q.ablation_table_arms() if a in r.arms] if abl else [],
                     init_mean, teacher_mean, plt)
    qp.plot_losses(plots / "training_losses.png", out, runs, [a for a in MAIN_ROWS if a in r.arms], q.labels, q.lm,
                   q.seeds[0], plt)
    first = q.seeds[0]
    panels = [("student at initialisation", out / "iia" / "student_init")] + \
        [(f"{q.labels[a]}, seed {first}", out / "iia" / run_name(a, 1, first)) for a in ("standard", "diito")]
    draw_heatmaps([(t, json.loads((f / "iia_results.json").read_text())["sweep"]) for t, f in panels],
                  plots / "iia_heatmaps.png")

    machine, stage_rows, stage_seconds = _stage_times(q, stages, runs, evals, alignment)
    corpus = stages["corpus"]

    atomic_write_text(out / "report.md", report_markdown(q, r, machine, table, abl, sentence, corpus, vocab, flops,
                                                         stages, stage_rows, sum(stage_seconds.values())))
    atomic_write_text(out / "report_table.md", table + ("\n" + abl if abl else ""))
    summary = _summary(q, r, stages, params, flops, vocab, sentence, stage_seconds)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _summary(q, r: Results, stages, params, flops, vocab, sentence, stage_seconds) -> dict:
    n_t = len(r.teachers)

    def keyed(d):
        return {key_text(k, n_t): v for k, v in d.items()}

    def comparison(c: Comparison) -> dict:
        return {"diff": c.diff, "ci95": [c.lo, c.hi], "p": c.p, "spread": c.spread, "n": c.n, "result": c.result}

    summary = {
        "preset": q.args.preset, "family": q.family, "seeds": q.seeds, "teachers": n_t, "vocab_size": vocab,
        "verdict": sentence, "test": TEST_NAME,
        "corpus": {k: stages["corpus"].get(k) for k in ("origin", "versions", "corpus_sha256", "train_documents",
                                                        "heldout_documents")},
        "teacher": {"perplexity": mean_std(list(r.teacher_ppl.values()))[0],
                    "per_teacher": {str(k): v for k, v in r.teacher_ppl.items()}, "parameters": params["teacher"],
                    "train_seconds": stages["teacher"]["train_seconds"], "steps": stages["teacher"]["steps"]},
    }
    for ref, name in (("init", "student_init"), ("random", "random_student")):
        summary[name] = {field: {str(k): v for k, v in values.items()} for field, values in r.ref[ref].items()}
    for a in r.arms:
        ppl = list(r.ppl[a].values())
        summary[a] = {
            "perplexity": keyed(r.ppl[a]), "mean": mean_std(ppl)[0], "std": mean_std(ppl)[1],
            "objective": r.arms[a].objective(q.lm), "main": r.arms[a].main,
            "learning_rate": learning_rate(r.arms[a], q.preset),
            "vs_init_perplexity": comparison(r.vs_init(a, "perplexity")),
            "parameters": params["student"], "train_seconds": keyed(r.seconds[a]), "steps": r.steps[a]}
        if r.arms[a].main:
            summary[a].update({"iia": keyed(r.iia[a]), "effective_iia": keyed(r.eff[a]),
                               "base_agreement": keyed(r.base[a]), "vs_init_iia": comparison(r.vs_init(a, "iia"))})
    summary["diito_against"] = {other: {m: comparison(r.between("diito", other, m)) for m in ("perplexity", "iia")}
                                for other in ("standard", "standard_eqc")}
    summary["flops_per_step"] = {k: flops[k] for k in ("standard", "diito", "ratio")}
    summary["stage_seconds"] = stage_seconds
    return summary


def _versions() -> str:
    try:
        from importlib.metadata import version

        return f"torch {version('torch')}, transformers {version('transformers')}"
    except Exception:  # noqa: BLE001 -- versions are a courtesy
        return ""


def _stage_times(q, stages: dict, runs: dict, evals: dict, alignment: dict):
    """(the machine in words, the rows of the stage-time table, the stages' seconds by name)."""
    groups = (("", stages), ("students: ", runs), ("evaluation: ", evals), ("alignment: ", alignment))
    stage_rows = [f"| {prefix}{k} | {format_seconds(v['seconds'])} | {v['finished']} |"
                  for prefix, records in groups for k, v in records.items()]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    machine = (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, "
               + ("GPU preset (--n_gpu 1 --bf16)" if q.preset.gpu else f"CPU only, {q.args.threads} thread(s) per process")
               + f", Python {platform.python_version()}, {_versions()}"
               + (f"; load average {load:.1f} when the report was written" if load is not None else ""))
    stage_seconds = {k: v["seconds"] for k, v in stages.items()}
    for group, records in (("students", runs), ("eval", evals), ("iia", alignment)):
        stage_seconds.update({f"{group}/{k}": v["seconds"] for k, v in records.items()})
    return machine, stage_rows, stage_seconds

