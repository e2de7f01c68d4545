#!/usr/bin/env python
"""The paper's tables in one command: distil, fine-tune, evaluate and tabulate the rows of
training_configs/paper/ through the project's own scripts, as a user would run them by hand.

    python scripts/reproduce.py --list                                   # the rows, with the original README's numbers
    python scripts/reproduce.py --rows distilbert-6L-0.1B,diito-6L-0.1B --seeds 3 --out repro --dry_run
    python scripts/reproduce.py --rows distilbert-6L-0.1B,diito-6L-0.1B --seeds 3 --out repro
    python scripts/reproduce.py --preset tiny --rows distilbert-6L-0.1B,diito-6L-0.1B --seeds 2 --out /tmp/tiny

The chain, every stage a command of this project (all saved in OUT/commands.sh, each one's output
in OUT/logs/):

  shared      once for all rows: scripts/binarized_data.py and scripts/token_counts.py per data
              recipe, scripts/extract_distilbert.py per student depth, scripts/make_mapping.py for
              mappings given by alignment name, the held-out data of run_iia.py
  distil      per row and seed: causal_train.py (torchrun over every visible GPU, or one process),
              the effective batch of the config kept whatever the number of GPUs
  finetune    per row, seed and task: run_glue.py (9 GLUE tasks), run_ner.py (CoNLL-2003),
              run_qa.py (SQuAD v1.1), run_mlm.py (WikiText-103 perplexity), run_iia.py (IIA), each
              with its own seed; --jobs N runs N at once (one GPU each)
  tables      OUT/paper_tables.md (and .json, plots/): the paper's tables, mean +- std over seeds
              with the per-seed values, the original README's numbers beside them, the compute used

Every stage is resumable: a stage records what it ran with in OUT/state/ once it has finished, and
a re-run skips every stage whose record matches; an interrupted distillation continues from its
last checkpoint (causal_train.py --resume), an interrupted fine-tuning from the Trainer's. Ctrl-C
or SIGTERM stops the running commands cleanly; run the same command again to continue.

--preset tiny swaps in local stand-ins (scripts/reproduce_tiny.py: a tokenizer, text, GLUE, CoNLL
and SQuAD files; a teacher trained from a config with run_mlm.py) and runs every stage for a few
steps: the whole chain on a CPU in minutes, offline. Its numbers mean nothing.

Cost: --dry_run prints every command and an estimate of the GPU-hours, from the token budget of
each row and a measured training speed (--bench_json, or the H200 figures of docs/gpu.md).
README.md, section "Reproducing the paper", and docs/reproduce.md say more.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import sys
import time
from pathlib import Path

from pipelines.reproduce.configs import (
    ALL_TASKS, CONFIG_DIR, GLUE_COLUMNS, GLUE_TASKS, TRAINED_TASKS, Row, available_rows, load_rows, parse_tasks,
)
from pipelines.reproduce.plan import Plan, Stage, detect_gpus
from pipelines.reproduce.runner import Runner, State, emit, now_iso, stage_status
from pipelines.reproduce.tables import format_hours, write_tables
from pipelines.stages import OFFLINE_ENV, Interrupted, StageFailed, check_out, format_seconds, lock_out
from atomic_files import atomic_write_text
from utils import CliError, REPO_ROOT, run_cli
logger = logging.getLogger("causal_distill.reproduce")

MANIFEST = "reproduce.json"
MANIFEST_TOOL = "causal-distill scripts/reproduce.py"
# Measured training speed used when no --bench_json is given: docs/gpu.md, one H200, bf16,
# bench/bench_train_step.py --preset base (BERT-base teacher, 6-block student), batch 40 of
# WikiText-like lengths (mean 62 tokens), the paper's setting; real (non-padding) tokens per second.
DEFAULT_SPEED = {"kd": 21836.0, "diito_shared": 16915.0}
DEFAULT_SPEED_SOURCE = ("docs/gpu.md: one NVIDIA H200, bf16, bench_train_step.py --preset base, batch 40 of "
                        "WikiText-like lengths (standard 21,836 and DIITO 16,915 real tokens/s)")


# --- the output folder -------------------------------------------------------------------------
def check_out_folder(out: Path, preset: str, rows: list[Row], force: bool) -> dict | None:
    """CliError when --out holds something else than this reproduction; returns its manifest (or None)."""
    manifest = check_out(out, MANIFEST, MANIFEST_TOOL, "scripts/reproduce.py")
    if manifest is None:
        return None
    if manifest.get("preset") != preset:
        raise CliError(f"--out {out} holds a reproduction with --preset {manifest.get('preset')}, not {preset}; "
                       f"choose another --out")
    if not force:
        for row in rows:
            recorded = manifest.get("rows", {}).get(row.name)
            if recorded is not None and recorded != row.fingerprint:
                raise CliError(f"--out {out} holds results of row {row.name} made with another version of {row.path}; "
                               f"choose another --out, or pass --force to redo every stage with the config as it is now")
    return manifest


def write_manifest(out: Path, preset: str, rows: list[Row], manifest: dict | None) -> None:
    record = manifest or {"tool": MANIFEST_TOOL, "version": 1, "preset": preset, "created": now_iso(), "rows": {}}
    record["rows"].update({row.name: row.fingerprint for row in rows})
    record["updated"] = now_iso()
    atomic_write_text(out / MANIFEST, json.dumps(record, indent=2) + "\n")


# --- the hub -----------------------------------------------------------------------------------
# Dataset names -> the repositories the scripts load them from (finetune_common.HUB_ALIASES, binarized_data.py).
HUB_DATASETS = {"wikitext": "Salesforce/wikitext", "glue": "nyu-mll/glue", "conll2003": "eriktks/conll2003",
                "squad": "rajpurkar/squad"}


def hub_names(plan: Plan, tasks: list[str]) -> dict[str, set[str]]:
    """{"model": {...}, "dataset": {...}}: what the plan reads from the hub (every name that is not a local path)."""
    names: dict[str, set[str]] = {"model": set(), "dataset": set()}
    for row in plan.rows:
        cfg = row.config
        for name in (cfg["teacher"]["name"], cfg["teacher"]["tokenizer"]):
            if not is_local(name):
                names["model"].add(name)
        if not cfg["data"].get("file_path"):
            names["dataset"].update(d.split(":")[0] for d in cfg["data"]["datasets"])
        for task in tasks:
            hub = cfg["finetune"][task]["hub_data"]
            if task in GLUE_TASKS:
                if "train_file" not in hub:
                    names["dataset"].add("glue")
            elif "dataset_name" in hub:
                names["dataset"].add(hub["dataset_name"])
    return names


def is_local(name: str) -> bool:
    """Whether a model or tokenizer name means a folder on disk rather than a hub repository."""
    return str(name).startswith(("/", ".", "~")) or Path(name).expanduser().exists()


def check_hub(plan: Plan, tasks: list[str], cache_dir: str | None) -> None:
    """One clear CliError, before anything runs, when the plan needs the hub and cannot have it:
    offline (HF_HUB_OFFLINE=1) with names missing from the cache, or online with the hub unreachable."""
    names = hub_names(plan, tasks)
    if not names["model"] and not names["dataset"]:
        return
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in OFFLINE_ENV)
    listed = ", ".join([*(f"model {n}" for n in sorted(names["model"])), *(f"dataset {n}" for n in sorted(names["dataset"]))])
    if offline:
        missing = [f"model {n}" for n in sorted(names["model"]) if not model_cached(n, cache_dir)]
        missing += [f"dataset {n}" for n in sorted(names["dataset"]) if not dataset_cached(n, cache_dir)]
        if missing:
            raise CliError(f"offline (HF_HUB_OFFLINE=1) and not in the cache: {', '.join(missing)}; run once with "
                           f"network access to fill the cache, or use --preset tiny for the offline chain")
        return
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    match = re.match(r"^(https?)://([^/:]+)(?::(\d+))?", endpoint)
    host = match.group(2) if match else "huggingface.co"
    port = int(match.group(3)) if match and match.group(3) else (80 if match and match.group(1) == "http" else 443)
    import socket

    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as err:
        raise CliError(f"cannot reach the hub at {host}:{port} ({err.strerror or err}); the rows need {listed}. "
                       f"Set HF_HUB_OFFLINE=1 to use a filled cache instead") from None


def model_cached(name: str, cache_dir: str | None) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("config.json", "tokenizer_config.json", "vocab.txt"):
        found = try_to_load_from_cache(name, filename, cache_dir=cache_dir)
        if isinstance(found, str):
            return True
    return False


def dataset_cached(name: str, cache_dir: str | None) -> bool:
    """Whether a dataset seems to be in the hub cache or in `datasets`' cache (by folder name)."""
    repo = HUB_DATASETS.get(name, name)
    candidates = []
    hub_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", hub_home / "hub"))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", hub_home / "datasets"))
    for root in filter(None, (cache_dir and Path(cache_dir), hub_cache, datasets_cache)):
        candidates += [root / f"datasets--{r.replace('/', '--')}" for r in {repo, name}]
        candidates += [root / r.replace("/", "___") for r in {repo, name}]
    return any(c.is_dir() for c in candidates)


# --- estimate ----------------------------------------------------------------------------------
def read_speed(bench_json: str | None, bf16: bool) -> tuple[dict, str]:
    """Real tokens/s per GPU for standard KD ('kd') and DIITO ('diito_shared'), and where they come from."""
    if not bench_json:
        return dict(DEFAULT_SPEED), DEFAULT_SPEED_SOURCE
    path = Path(bench_json)
    try:
        rows = json.loads(path.read_text())["rows"]
    except FileNotFoundError:
        raise CliError(f"--bench_json {path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CliError(f"--bench_json {path}: not a bench/bench_train_step.py --json_out file ({err})") from None
    dtype = "bf16" if bf16 else "fp32"
    speed = {}
    for mode, fallbacks in (("kd", ("kd",)), ("diito_shared", ("diito_shared", "diito_plain"))):
        for name in fallbacks:
            found = [r for r in rows if r.get("mode") == name and r.get("tok_s")]
            found = [r for r in found if r.get("dtype") == dtype] or found
            if found:
                speed[mode] = float(found[0]["tok_s"])
                break
        else:
            raise CliError(f"--bench_json {path}: no row of mode {mode} with tok_s")
    return speed, (f"{path}: bench_train_step.py rows kd {speed['kd']:,.0f} and DIITO {speed['diito_shared']:,.0f} "
                   f"real tokens/s ({dtype} preferred)")


def estimate(stages: list[Stage], statuses: dict, speed: dict, source: str) -> list[str]:
    """Lines of the GPU-hours estimate for `stages` (those not done yet, and all)."""
    def distil_hours(s: Stage) -> float:
        return s.info["tokens"] / speed[s.info["mode"]] / 3600

    def finetune_hours(s: Stage) -> float:
        args = s.info["args"]
        if s.info["task"] not in TRAINED_TASKS:
            return 0.0
        length = args.get("max_seq_length", 384 if s.info["task"] == "squad" else 128)
        tokens = s.info["train_examples"] * args.get("num_train_epochs", 1) * length
        return tokens / speed["kd"] / 3600

    lines = [f"Estimate of the compute (tokens/s per GPU from {source}):"]
    for label, pick in (("still to run", lambda s: statuses[s.id] != "done"), ("whole chain", lambda s: True)):
        d = [s for s in stages if s.phase == "distil" and pick(s)]
        f = [s for s in stages if s.phase == "finetune" and pick(s)]
        dh, fh = sum(map(distil_hours, d)), sum(map(finetune_hours, f))
        lines.append(f"  {label}: distillation {len(d)} run(s), {format_hours(dh)} GPU-hours "
                     f"(token budget x epochs / tokens per second); fine-tuning {len(f)} run(s), at most "
                     f"{format_hours(fh)} GPU-hours; in all {format_hours(dh + fh)} GPU-hours: about "
                     f"{format_hours(dh + fh)} h on 1 GPU, {format_hours((dh + fh) / 8)} h on 8")
    lines.append("  Distillation assumes the speed scales with the number of GPUs (torchrun, DDP). Fine-tuning is an "
                 "upper bound: every example padded to --max_seq_length, at the distillation's standard-KD speed "
                 "(which also runs the 12-layer teacher); evaluation-only tasks (mlm, iia) take minutes and are left out.")
    return lines


# --- listing -----------------------------------------------------------------------------------
def list_rows(config_dir: Path) -> str:
    """A markdown table of every row with its published numbers ((-) where there are none)."""
    rows = load_rows(available_rows(config_dir), config_dir)
    headers = ["row", "model", "tokens", "mapping", "GLUE avg", *[h for _, h in GLUE_COLUMNS], "CoNLL F1",
               "SQuAD EM/F1", "perplexity"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]

    def cell(value) -> str:
        return "(-)" if value is None else f"{value:.2f}"

    for row in rows:
        cfg, pub = row.config, row.config["published"]
        glue = pub["glue"] or {}
        nm = cfg["neuron_mapping"]
        mapping = "-" if nm is None else nm.get("file", nm.get("alignment", "")).replace("training_configs/", "")
        squad = pub["squad"] or {}
        lines.append("| " + " | ".join([row.name, cfg["label"], cfg["data"]["training_tokens"], mapping,
                                 cell(glue.get("average")), *[cell(glue.get(t)) for t, _ in GLUE_COLUMNS],
                                 cell((pub["conll2003"] or {}).get("f1")),
                                 f"{cell(squad.get('exact_match'))}/{cell(squad.get('f1'))}",
                                 cell(pub["perplexity"])]) + " |")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = parser.add_argument
    a("--rows", default=None, help="Comma-separated row names (training_configs/paper/<row>.json); --list shows them.")
    a("--seeds", type=int, default=3, help="Distillation seeds per row, 1..N (default 3); the tables give mean +- std "
                                           "over them.")
    a("--out", default=None, help="Output folder: every result, OUT/commands.sh, OUT/logs/, OUT/paper_tables.md. "
                                  "Run the same command again to continue an interrupted reproduction.")
    a("--preset", choices=("paper", "tiny"), default="paper",
      help="paper (default): the configs as they are, hub models and data. tiny: local stand-ins and a few steps of "
           "every stage, offline, on the CPU in minutes (the chain's proof, not the paper's numbers).")
    a("--only", choices=("distil", "finetune", "tables"), default=None,
      help="distil: the shared stages and the distillations; finetune: fine-tuning and evaluation of students "
           "already distilled, then the tables; tables: only rewrite OUT/paper_tables.md from what is there.")
    a("--tasks", default=None, help="Comma-separated tasks to fine-tune/evaluate (default all): "
                                    + ", ".join(ALL_TASKS) + "; 'glue' stands for the nine GLUE tasks.")
    a("--finetune_seeds", type=int, default=1,
      help="Fine-tuning runs per student and task (default 1, seeded by the student's seed; more: seeds s+1000, "
           "s+2000, ...); a student's score is their mean.")
    a("--dry_run", action="store_true", help="Print every command (marked done / to run / resume) and the compute "
                                             "estimate; run and write nothing.")
    a("--list", action="store_true", help="Print the rows with their published numbers (the original README's table), and exit.")
    a("--gpus", type=int, default=None, help="GPUs to use (default: every GPU torch sees; 0: the CPU). Distillation "
                                            "runs under torchrun over all of them.")
    a("--jobs", type=int, default=None, help="Fine-tuning runs at once (default: one per GPU, 1 on the CPU); each gets "
                                            "one GPU.")
    a("--precision", choices=("auto", "fp32", "bf16"), default="auto",
      help="auto (default): bf16 on GPUs, fp32 on the CPU.")
    a("--bench_json", default=None, help="A bench/bench_train_step.py --json_out file measured on your GPU: its tokens/s "
                                         "drive the --dry_run estimate (default: the H200 figures of docs/gpu.md).")
    a("--cache_dir", default=None, help="Hub cache folder, passed to every script.")
    a("--config_dir", default=str(CONFIG_DIR), help="Folder of row configs (default training_configs/paper).")
    a("--force", action="store_true", help="Redo every stage, and accept an OUT whose rows were made with older "
                                           "configs.")
    a("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
      help="CPU runs only: threads per process, shared among --jobs (default: half the cores; processes fighting "
           "over the same cores run several times slower).")
    a("--progress_interval", type=float, default=60.0, help="Seconds between progress lines of a running command "
                                                             "(default 60).")
    args = parser.parse_args(argv)
    for flag in ("seeds", "finetune_seeds", "threads"):
        if getattr(args, flag) < 1:
            raise CliError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.gpus is not None and args.gpus < 0:
        raise CliError(f"--gpus must be 0 or more, got {args.gpus}")
    if args.jobs is not None and args.jobs < 1:
        raise CliError(f"--jobs must be at least 1, got {args.jobs}")
    if not args.list:
        if not args.rows:
            raise CliError("--rows is required (comma-separated row names; --list shows them)")
        if not args.out:
            raise CliError("--out is required (the folder for this reproduction)")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Run (or --dry_run, or --list) the reproduction `argv` asks for; returns what ran and what was skipped."""
    args = parse_args(argv)
    config_dir = Path(args.config_dir)
    if args.list:
        emit(list_rows(config_dir))
        return {}
    names = list(dict.fromkeys(n.strip() for n in args.rows.split(",") if n.strip()))
    if not names:
        raise CliError("--rows is empty")
    rows = load_rows(names, config_dir)
    tasks = parse_tasks(args.tasks)
    out = Path(args.out).resolve()
    check_out_folder(out, args.preset, rows, args.force)  # before any work: a foreign --out is refused at once
    gpus = args.gpus if args.gpus is not None else (0 if args.preset == "tiny" else detect_gpus())
    if args.preset == "tiny" and gpus:
        raise CliError("--preset tiny runs on the CPU; leave --gpus out (or 0)")
    jobs = args.jobs or max(1, gpus)
    plan = Plan(args, rows, tasks, out, gpus)
    stages = plan.ordered(args.only)
    state = State(out)
    statuses = {}
    for stage in plan.stages.values():
        statuses[stage.id] = stage_status(plan, stage, state, args.force)

    if args.dry_run:
        emit(f"# scripts/reproduce.py --dry_run: {len(stages)} stages for rows {', '.join(names)}, seeds "
              f"1..{args.seeds}, tasks {', '.join(tasks)}; preset {args.preset}; "
              f"{gpus} GPU(s) ({'torchrun --nproc_per_node ' + str(gpus) if gpus > 1 else 'one process'}), "
              f"{jobs} fine-tuning job(s) at once")
        emit(f"cd {shlex.quote(str(REPO_ROOT))}")
        for stage in stages:
            emit(f"# [{statuses[stage.id]}] {stage.title}")
            if stage.work is not None:
                emit(f"#   in scripts/reproduce.py: {stage.info['work']}")
            for i, command in enumerate(stage.commands):
                extra = ()
                if stage.kind == "distil" and i == 0:
                    extra = ("--resume",) if statuses[stage.id] == "resume" else ("--force",)
                emit(command.shown(extra))
        speed, source = read_speed(args.bench_json, plan.bf16)
        for line in estimate(stages, statuses, speed, source):
            emit("# " + line)
        return {"stages": [s.id for s in stages], "statuses": statuses}

    if args.only == "finetune":
        missing = [s.title for s in plan.stages.values() if s.phase == "distil" and statuses[s.id] != "done"]
        if missing:
            raise CliError(f"--only finetune needs the students distilled first; not done: {', '.join(missing[:4])}"
                           + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                           + " (run without --only, or with --only distil)")
    read_speed(args.bench_json, plan.bf16)  # a bad --bench_json is an error before anything runs
    if args.only != "tables" and any(statuses[s.id] != "done" for s in stages):
        check_hub(plan, tasks, args.cache_dir)

    return run_plan(args, plan, rows, stages, jobs)


def run_plan(args, plan: Plan, rows: list[Row], stages: list[Stage], jobs: int) -> dict:
    """Run `stages` (those found done are skipped) under the --out lock, then write the tables."""
    out = plan.out
    lock = lock_out(out)  # one reproduction per --out at a time
    try:
        manifest = check_out_folder(out, args.preset, rows, args.force)  # (again, under the lock)
        out.mkdir(parents=True, exist_ok=True)
        write_manifest(out, args.preset, rows, manifest)
        runner = Runner(plan, args.force, jobs, args.progress_interval)
        previous = {sig: signal.signal(sig, runner.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        start = time.time()
        try:
            if stages:
                runner.run(stages)
        except Interrupted:
            logger.error("stopped by %s after %s; run the same command again to continue (finished stages are "
                         "skipped, a distillation resumes from its last checkpoint)",
                         signal.Signals(runner.stop_signal).name, format_seconds(time.time() - start))
            sys.exit(128 + runner.stop_signal)
        except StageFailed as err:
            logger.error("%s", err)
            logger.error("fix the cause and run the same command again: finished stages are skipped")
            sys.exit(1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        tables = write_tables(plan, State(out))
        logger.info("finished in %s: ran %d stage(s), skipped %d found done; tables in %s",
                    format_seconds(time.time() - start), len(runner.ran), len(runner.skipped), tables)
    finally:
        lock.release()
    return {"ran": runner.ran, "skipped": runner.skipped, "tables": str(tables)}


if __name__ == "__main__":
    run_cli(main)
