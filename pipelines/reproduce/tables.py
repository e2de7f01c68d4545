"""OUT/paper_tables.md for `scripts/reproduce.py`: the paper's tables from the results of a reproduction.

Reads what the finished stages left (eval_results.json of run_glue.py, run_ner.py, run_qa.py and
run_mlm.py; iia_results.json of run_iia.py; the stage records in OUT/state/) and writes, each
atomically: OUT/paper_tables.md (GLUE with the seed README's columns, SQuAD, CoNLL-2003, perplexity,
IIA, compute), OUT/paper_tables.json (every number) and one plot per table in OUT/plots/.

A cell of "ours" is the mean +- the sample standard deviation over the seeds asked for, shown only
when every one of them has the result; the per-seed values are listed beneath. A GLUE average is
taken only over all eight columns. Anything missing shows as (-), never as a mean over less.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import sys
import tempfile
from pathlib import Path

from pipelines.reproduce.configs import GLUE_COLUMNS, GLUE_TASKS
from pipelines.stages import format_seconds
from atomic_files import atomic_write_text
from run_records import git_info

# Each table: its title, the tasks it reads, its columns (key, header) and whether lower is better.
TABLES = {
    "glue": {"title": "GLUE (dev sets)", "columns": [("average", "Average-score"), *GLUE_COLUMNS]},
    "squad": {"title": "SQuAD v1.1 (dev set)", "columns": [("exact_match", "EM"), ("f1", "F1")]},
    "conll2003": {"title": "CoNLL-2003 NER (dev set)", "columns": [("f1", "F1"), ("precision", "precision"),
                                                                   ("recall", "recall")]},
    "perplexity": {"title": "WikiText-103 masked-LM perplexity (validation set; lower is better)",
                   "columns": [("perplexity", "perplexity")]},
    "iia": {"title": "Causal alignment with the teacher (run_iia.py; not in the paper)",
            "columns": [("iia", "IIA %"), ("effective_iia", "effective IIA %"), ("base_agreement", "base agreement %")]},
}


def task_metrics(task: str, folder: Path) -> dict | None:
    """The scores of one finished run (x100 except perplexity), or None when its results file is missing."""
    name = "iia_results.json" if task == "iia" else "eval_results.json"
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None

    def pct(key: str, source: dict = data) -> float | None:
        value = source.get(key)
        return None if value is None or not math.isfinite(float(value)) else 100.0 * float(value)

    if task in GLUE_TASKS:
        key = {"cola": "eval_matthews_correlation", "mrpc": "eval_f1", "stsb": "eval_pearson"}.get(task, "eval_accuracy")
        result = {"score": pct(key)}
        if task == "mnli":
            result["mismatched"] = pct("eval_accuracy_mm")
        return result
    if task == "conll2003":
        return {k: pct(f"eval_{k}") for k in ("f1", "precision", "recall", "accuracy")}
    if task == "squad":  # run_qa.py reports SQuAD in percent already
        return {k: data.get(f"eval_{k}") for k in ("exact_match", "f1")}
    if task == "mlm":
        return {"perplexity": data.get("perplexity")}
    if task == "iia":
        mapping = data.get("mapping", {})
        overall = mapping.get("overall", {})
        return {"iia": pct("value", overall.get("iia", {})),
                "effective_iia": pct("value", overall.get("effective_iia", {})),
                "base_agreement": pct("value", mapping.get("base_agreement", {}))}
    raise ValueError(task)


def collect(plan, state) -> dict:
    """row -> seed -> task -> scores, from every finished fine-tuning/evaluation stage (fine-tuning
    replicates averaged, and only when all of them finished)."""
    runs: dict = {}
    for stage in plan.stages.values():
        if stage.phase != "finetune":
            continue
        info = stage.info
        slot = runs.setdefault(info["row"], {}).setdefault(info["seed"], {}).setdefault(info["task"], [])
        marker = state.read(stage)
        slot.append(task_metrics(info["task"], stage.folder) if marker is not None else None)
    results: dict = {}
    for row, seeds in runs.items():
        for seed, tasks in seeds.items():
            for task, replicates in tasks.items():
                if any(r is None for r in replicates):
                    continue
                keys = replicates[0].keys()
                merged = {}
                for key in keys:
                    values = [r.get(key) for r in replicates]
                    merged[key] = None if any(v is None for v in values) else sum(values) / len(values)
                results.setdefault(row, {}).setdefault(seed, {})[task] = merged
    return results


def seed_values(table: str, results: dict, row: str, seed: int) -> dict:
    """The columns of `table` for one seed of one row: {column: value or None}."""
    found = results.get(row, {}).get(seed, {})
    if table == "glue":
        values = {t: (found.get(t) or {}).get("score") for t, _ in GLUE_COLUMNS}
        scores = list(values.values())
        values["average"] = None if any(v is None for v in scores) else sum(scores) / len(scores)
        values["wnli"] = (found.get("wnli") or {}).get("score")
        values["mnli_mm"] = (found.get("mnli") or {}).get("mismatched")
        return values
    task = {"perplexity": "mlm"}.get(table, table)
    scores = found.get(task) or {}
    return {key: scores.get(key) for key, _ in TABLES[table]["columns"]}


def summarize(values: list) -> dict:
    """Mean and sample standard deviation of `values`; both None when any value is missing."""
    if not values or any(v is None for v in values):
        return {"mean": None, "std": None, "n": sum(v is not None for v in values)}
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return {"mean": mean, "std": std, "n": len(values)}


def published(table: str, config: dict) -> dict:
    pub = config["published"]
    if table == "glue":
        return dict(pub["glue"] or {})
    if table == "perplexity":
        return {"perplexity": pub["perplexity"]}
    if table == "iia":
        return {}
    return dict(pub[table] or {})


def md_row(cells: list) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def md_header(headers: list) -> list[str]:
    return [md_row(headers), "|" + "|".join(["---"] * len(headers)) + "|"]


def fmt(value, digits: int = 2) -> str:
    return "(-)" if value is None else f"{value:.{digits}f}"


def fmt_summary(s: dict, digits: int = 2) -> str:
    if s["mean"] is None:
        return "(-)"
    return fmt(s["mean"], digits) + ("" if s["std"] is None else f" ± {s['std']:.{digits}f}")


def format_hours(hours: float) -> str:
    """Hours with a sensible number of digits."""
    if hours >= 100:
        return f"{hours:,.0f}"
    if hours >= 1:
        return f"{hours:.1f}"
    return f"{hours:.2f}" if hours >= 0.01 else f"{hours:.4f}"


def build(plan, state) -> dict:
    """Every number of the tables: per table, row: per-seed values, summaries, paper, difference."""
    results = collect(plan, state)
    seeds = plan.seeds
    data = {"tables": {}, "compute": compute(plan, state)}
    for table, spec in TABLES.items():
        rows = {}
        for row in plan.rows:
            per_seed = {s: seed_values(table, results, row.name, s) for s in seeds}
            keys = [k for k, _ in spec["columns"]] + (["wnli", "mnli_mm"] if table == "glue" else [])
            summary = {k: summarize([per_seed[s].get(k) for s in seeds]) for k in keys}
            paper = published(table, row.config)
            diff = {k: (summary[k]["mean"] - paper[k]) if summary[k]["mean"] is not None and paper.get(k) is not None
                    else None for k, _ in spec["columns"]}
            rows[row.name] = {"label": row.label, "tokens": row.config["data"]["training_tokens"],
                              "per_seed": per_seed, "ours": summary, "paper": paper, "difference": diff}
        data["tables"][table] = rows
    return data


def compute(plan, state) -> dict:
    """Per row and seed: the distillation's wall time, devices and device-hours; fine-tuning's device-hours."""
    rows = {}
    for stage in plan.stages.values():
        if stage.phase not in ("distil", "finetune"):
            continue
        marker = state.read(stage)
        entry = rows.setdefault(stage.info["row"], {}).setdefault(stage.info["seed"], {
            "distil_seconds": None, "distil_devices": None, "device": None, "resumed": None, "speed_tok_s": None,
            "finetune_device_hours": 0.0, "finetune_runs": 0, "finetune_missing": 0})
        if marker is None:
            if stage.phase == "finetune":
                entry["finetune_missing"] += 1
            continue
        hours = marker["seconds"] * max(1, marker.get("gpus") or 0) / 3600
        if stage.phase == "distil":
            entry.update(distil_seconds=marker["seconds"], distil_devices=marker.get("gpus"), device=marker.get("device"),
                         resumed=marker.get("resumed"), speed_tok_s=marker.get("speed_tok_s"), distil_device_hours=hours)
        else:
            entry["finetune_device_hours"] += hours
            entry["finetune_runs"] += 1
            entry["device"] = entry["device"] or marker.get("device")
    return rows


def markdown(plan, data: dict) -> str:
    seeds = plan.seeds
    lines = ["# The paper's tables, reproduced", ""]
    git = git_info()
    lines += [f"Made by `{shlex.join(['python', 'scripts/reproduce.py', *sys.argv[1:]])}`"
              + (f" at commit `{git['repo_sha'][:10]}`{' (with uncommitted changes)' if git.get('dirty') else ''}"
                 if git else "") + f"; preset `{plan.args.preset}`; rows {', '.join(r.name for r in plan.rows)}; "
              f"distillation seeds {', '.join(map(str, seeds))}"
              + (f"; {plan.finetune_seeds} fine-tuning runs per student and task, averaged" if plan.finetune_seeds > 1
                 else "; each student fine-tuned once per task, with its own seed") + ".", ""]
    if plan.args.preset == "tiny":
        lines += ["**Preset tiny**: local stand-ins (a generated language, a 12 x 48 teacher trained for a minute, a "
                  "few steps of every stage). These numbers show that every stage of the chain runs; they say "
                  "nothing about the paper's results.", ""]
    lines += ["How to read: *ours* is the mean ± the sample standard deviation over the seeds (the values of each "
              "seed are in the table beneath); *original README* is the published number (the row config's "
              "`published`: the original README's table, with its source; the paper's own tables are not "
              "transcribed); *difference* is ours − that number. (-) is missing: a task not run, not finished for "
              "every seed, or not published. A GLUE average is taken over all eight columns only.", ""]
    for table, spec in TABLES.items():
        rows = data["tables"][table]
        headers = ["Model", "# of Training Tokens", ""] + [h for _, h in spec["columns"]]
        lines += [f"## {spec['title']}", "", *md_header(headers)]
        for row in plan.rows:
            r = rows[row.name]
            lines.append(md_row([r["label"], r["tokens"], f"ours ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})"]
                                + [fmt_summary(r["ours"][k]) for k, _ in spec["columns"]]))
            if table != "iia":
                lines.append(md_row(["", "", "original README"] + [fmt(r["paper"].get(k)) for k, _ in spec["columns"]]))
                lines.append(md_row(["", "", "difference"] + [
                    "(-)" if r["difference"][k] is None else f"{r['difference'][k]:+.2f}" for k, _ in spec["columns"]]))
        extra = [("wnli", "WNLI"), ("mnli_mm", "MNLI-mm")] if table == "glue" else []
        headers = ["Model", "# of Training Tokens", "seed"] + [h for _, h in spec["columns"]] + [h for _, h in extra]
        lines += ["", "Per seed:", "", *md_header(headers)]
        for row in plan.rows:
            r = rows[row.name]
            for s in seeds:
                values = r["per_seed"][s]
                lines.append(md_row([r["label"], r["tokens"], s]
                                    + [fmt(values.get(k)) for k, _ in [*spec["columns"], *extra]]))
        lines += ["", f"![{spec['title']}](plots/{table}.png)", ""]
        if table == "glue":
            lines += ["CoLA: Matthews correlation; MRPC: F1; STS-B: Pearson; MNLI: matched accuracy; the others: "
                      "accuracy; all x100, as in the seed README's table. WNLI and MNLI mismatched are run too and "
                      "listed per seed, outside the average.", ""]
    lines += ["## Compute used", "", *md_header([
        "Model", "# of Training Tokens", "seed", "distillation wall time", "devices", "distillation device-hours",
        "measured tok/s (last log)", "resumed", "fine-tuning + evaluation device-hours (runs)"])]
    total = {"distil": 0.0, "finetune": 0.0}
    devices = set()
    for row in plan.rows:
        for s in seeds:
            c = data["compute"].get(row.name, {}).get(s, {})
            if c.get("device"):
                devices.add(c["device"])
            if c.get("distil_seconds") is not None:
                total["distil"] += c["distil_device_hours"]
            total["finetune"] += c.get("finetune_device_hours", 0.0)
            missing = c.get("finetune_missing", 0)
            lines.append(md_row([
                row.label, row.config["data"]["training_tokens"], s,
                "(-)" if c.get("distil_seconds") is None else format_seconds(c["distil_seconds"], compact=True),
                f"{c.get('distil_devices') or 0} GPU(s)" if c.get("distil_devices") else "CPU",
                "(-)" if c.get("distil_seconds") is None else format_hours(c["distil_device_hours"]),
                "(-)" if not c.get("speed_tok_s") else f"{c['speed_tok_s']:,.0f}",
                "(-)" if c.get("resumed") is None else ("yes" if c["resumed"] else "no"),
                f"{format_hours(c.get('finetune_device_hours', 0.0))} ({c.get('finetune_runs', 0)}"
                + (f", {missing} not done" if missing else "") + ")"]))
    lines += ["", f"In all: {format_hours(total['distil'])} device-hours of distillation and "
              f"{format_hours(total['finetune'])} of fine-tuning and evaluation, on "
              f"{'; '.join(sorted(devices)) or '(nothing run yet)'}. Device-hours are wall time x GPUs (x 1 on the "
              "CPU); the runs' own logs are in logs/.", ""]
    return "\n".join(lines)


def plot(table: str, plan, data: dict, path: Path) -> None:
    """A grouped bar chart of one table: ours (mean, std as error bars) per row, the published numbers (the original
    README's) as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = TABLES[table]
    columns = spec["columns"]
    rows = data["tables"][table]
    n = max(1, len(plan.rows))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(columns) * (1 + 0.25 * n)), 4.2))
    anything = False
    for i, row in enumerate(plan.rows):
        r = rows[row.name]
        xs = [j - 0.4 + width * (i + 0.5) for j in range(len(columns))]
        means = [r["ours"][k]["mean"] for k, _ in columns]
        stds = [r["ours"][k]["std"] or 0.0 for k, _ in columns]
        present = [(x, m, sd) for x, m, sd in zip(xs, means, stds) if m is not None]
        anything |= bool(present)
        label = f"{r['label']}, {r['tokens']}"
        ax.bar([p[0] for p in present], [p[1] for p in present], width * 0.9, yerr=[p[2] for p in present],
                      capsize=2, color=f"C{i}", label=f"{label}: ours")
        for x, m in zip(xs, means):
            if m is None:
                ax.text(x, 0, "(-)", ha="center", va="bottom", fontsize=6, color=f"C{i}")
        paper = [(x, r["paper"].get(k)) for x, (k, _) in zip(xs, columns) if r["paper"].get(k) is not None]
        if paper:
            ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="_", s=250, linewidths=3, color=f"C{i}",
                       zorder=3, label=f"{label}: original README")
            anything = True
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([h for _, h in columns])
    ax.set_title(spec["title"], fontsize=10)
    if not anything:
        ax.text(0.5, 0.5, "no results yet", transform=ax.transAxes, ha="center", va="center")
    else:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_tables(plan, state) -> Path:
    """Write OUT/paper_tables.md, OUT/paper_tables.json and OUT/plots/<table>.png; returns the .md path."""
    data = build(plan, state)
    out = plan.out
    for table in TABLES:
        plot(table, plan, data, out / "plots" / f"{table}.png")
    atomic_write_text(out / "paper_tables.json", json.dumps(data, indent=2, default=str) + "\n")
    atomic_write_text(out / "paper_tables.md", markdown(plan, data))
    return out / "paper_tables.md"
