#!/usr/bin/env python
"""Print the GLUE dev-set table (markdown) from the eval_results.json files of run_glue.py runs.

Each model is one row. Give its results either as a runs folder holding one sub-folder per task
(named after the task: cola, mnli, mrpc, qnli, qqp, rte, sst2, stsb; sst-2/sts-b also accepted),
each with the eval_results.json that run_glue.py wrote:

    python scripts/glue_table.py --run "DIITO (6 layers)=./results/diito" --run "DistilBERT=./results/distilbert"

or task by task (these override a --run folder's file for that task):

    python scripts/glue_table.py --result "DIITO (6 layers):cola=./cola_run/eval_results.json" ...

Scores follow the paper's table, x100 with 2 decimals: CoLA Matthews correlation, MNLI matched
accuracy, MRPC F1, QNLI accuracy, QQP accuracy, RTE accuracy, SST-2 accuracy, STS-B Pearson
(--mrpc_metric acc_f1 and --stsb_metric pearson_spearman average the two instead). Average-score
is the mean of the eight; a missing task prints (-) and then the average is (-) too, rather than
an average over fewer tasks. --tokens "MODEL=0.1B" adds the "# of Training Tokens" column.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from utils import CliError, run_cli


logger = logging.getLogger("causal_distill.glue_table")

# Column order and headers of the table.
TASKS = [("cola", "CoLA"), ("mnli", "MNLI"), ("mrpc", "MRPC"), ("qnli", "QNLI"), ("qqp", "QQP"), ("rte", "RTE"), ("sst2", "SST-2"), ("stsb", "STS-B")]
TASK_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "mnli_matched": "mnli"}


def metric_keys(task: str, mrpc_metric: str = "f1", stsb_metric: str = "pearson") -> list[str]:
    """The eval_results.json keys averaged into a task's score."""
    if task == "cola":
        return ["eval_matthews_correlation"]
    if task == "mrpc":
        return ["eval_f1"] if mrpc_metric == "f1" else ["eval_accuracy", "eval_f1"]
    if task == "stsb":
        return ["eval_pearson"] if stsb_metric == "pearson" else ["eval_pearson", "eval_spearmanr"]
    return ["eval_accuracy"]  # mnli: the matched set (eval_accuracy_mm is the mismatched one)


def task_score(results: dict, task: str, source: str, **choice) -> float | None:
    """The task's score x100 from one eval_results.json dict; None (with a warning) if a key is missing."""
    values = []
    for key in metric_keys(task, **choice):
        value = results.get(key)
        if value is None:
            logger.warning("%s has no %s: %s shown as (-)", source, key, task)
            return None
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise CliError(f"{source}: {key} is {value!r}, not a number") from None
        if math.isfinite(number) and abs(number) > 1:
            # accuracy, F1, Matthews and Pearson lie in [-1, 1]: 85.3 is a percentage already, and x100 would print 8530
            raise CliError(f"{source}: {key} is {value!r}, outside [-1, 1]: already a percentage? glue_table.py reads "
                           f"the fractions run_glue.py writes (0.853 for 85.3%)")
        values.append(number)
    score = 100.0 * sum(values) / len(values)
    if not math.isfinite(score):
        logger.warning("%s: %s is not a finite number (%s): %s shown as (-)", source, task, values, task)
        return None
    return score


def _split_spec(spec: str, flag: str) -> tuple[str, str]:
    if "=" not in spec:
        raise CliError(f"{flag} {spec!r}: expected NAME=VALUE")
    name, value = spec.split("=", 1)
    if not name.strip() or not value.strip():
        raise CliError(f"{flag} {spec!r}: expected NAME=VALUE")
    return name.strip(), value.strip()


def _canonical_task(name: str, spec: str) -> str:
    task = TASK_ALIASES.get(name.lower(), name.lower())
    if task not in dict(TASKS):
        raise CliError(f"--result {spec!r}: unknown task {name!r}; choose from {', '.join(t for t, _ in TASKS)}")
    return task


def _read_results(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CliError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: expected a JSON object of metrics")
    return data


def collect(runs: list[str], results: list[str]) -> dict[str, dict[str, Path | None]]:
    """Model -> task -> the eval_results.json path (None when that task has no results), in the order given."""
    table: dict[str, dict[str, Path | None]] = {}
    for spec in runs:
        model, folder = _split_spec(spec, "--run")
        root = Path(folder)
        if not root.is_dir():
            raise CliError(f"--run {spec!r}: {root} is not a folder")
        row = table.setdefault(model, {})
        for task, header in TASKS:
            names = {task, header.lower(), *[a for a, t in TASK_ALIASES.items() if t == task]}
            found = [root / n / "eval_results.json" for n in sorted(names) if (root / n / "eval_results.json").is_file()]
            row.setdefault(task, found[0] if found else None)
    for spec in results:
        left, path = _split_spec(spec, "--result")
        if ":" not in left:
            raise CliError(f"--result {spec!r}: expected MODEL:TASK=path/eval_results.json")
        model, task_name = left.rsplit(":", 1)
        task = _canonical_task(task_name.strip(), spec)
        file = Path(path)
        if not file.is_file():
            raise CliError(f"--result {spec!r}: {file} does not exist")
        table.setdefault(model.strip(), {t: None for t, _ in TASKS})[task] = file
    return table


def render(table: dict, tokens: dict[str, str] | None = None, **choice) -> str:
    """The markdown table for `table` (model -> task -> results path or None)."""
    tokens = tokens or {}
    with_tokens = bool(tokens)
    headers = ["Model"] + (["# of Training Tokens"] if with_tokens else []) + ["Average-score"] + [h for _, h in TASKS]
    lines = [" | ".join(headers) + " |", "|".join(["---"] * len(headers)) + "|"]
    for model, row in table.items():
        scores = []
        for task, _ in TASKS:
            path = row.get(task)
            if not path:
                logger.warning("%s: no eval_results.json for %s: shown as (-)", model, task)
            scores.append(task_score(_read_results(path), task, str(path), **choice) if path else None)
        average = None if any(s is None for s in scores) else sum(scores) / len(scores)
        cells = [model] + ([tokens.get(model, "(-)")] if with_tokens else []) + [_cell(average)] + [_cell(s) for s in scores]
        lines.append(" | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "(-)" if value is None else f"{value:.2f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run",
        action="append",
        default=[],
        metavar="MODEL=FOLDER",
        help="A model's row: FOLDER holds one sub-folder per task (cola, mnli, ...) with eval_results.json. Repeatable.",
    )
    parser.add_argument(
        "--result",
        action="append",
        default=[],
        metavar="MODEL:TASK=FILE",
        help="One task's eval_results.json for a model (overrides its --run folder for that task). Repeatable.",
    )
    parser.add_argument(
        "--tokens", action="append", default=[], metavar="MODEL=AMOUNT", help='Add a "# of Training Tokens" column, e.g. "DIITO=0.1B".'
    )
    parser.add_argument(
        "--mrpc_metric", choices=["f1", "acc_f1"], default="f1", help="MRPC score: F1 (default) or the mean of accuracy and F1."
    )
    parser.add_argument(
        "--stsb_metric",
        choices=["pearson", "pearson_spearman"],
        default="pearson",
        help="STS-B score: Pearson (default) or the mean of Pearson and Spearman.",
    )
    return parser


def main(argv: list[str] | None = None) -> str:
    """Print the table for the command line `argv` and return it."""
    args = build_parser().parse_args(argv)
    if not args.run and not args.result:
        raise CliError("nothing to tabulate: pass --run MODEL=FOLDER or --result MODEL:TASK=FILE")
    table = collect(args.run, args.result)
    tokens = dict(_split_spec(spec, "--tokens") for spec in args.tokens)
    text = render(table, tokens, mrpc_metric=args.mrpc_metric, stsb_metric=args.stsb_metric)
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
