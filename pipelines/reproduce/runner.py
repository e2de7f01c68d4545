"""How `scripts/reproduce.py` runs its plan: stage records (a finished stage is skipped), the
commands as subprocesses (one at a time or one job per GPU), their logs and progress, resume after
a stop."""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from pipelines.reproduce.plan import VOLATILE_FLAGS, CommandLine, Plan, Stage, device_description
from pipelines.stages import CHILD_ENV, OFFLINE_ENV, Interrupted, StageFailed, fingerprint, format_seconds
from atomic_files import atomic_write_text
from utils import REPO_ROOT

logger = logging.getLogger("causal_distill.reproduce")

PROGRESS_TQDM = re.compile(r"(\d+)/(\d+) \[")
STEP_LINE = re.compile(r"step (\d+) \| .*?\| ([\d.]+) tok/s")
TOTAL_LINE = re.compile(r"training for (\d+) optimiser steps")


# --- markers -----------------------------------------------------------------------------------
class State:
    """The per-stage records in OUT/state/: `<id>.json` once a stage has finished, `<id>.started.json` while it runs."""

    def __init__(self, out: Path):
        self.folder = out / "state"

    def read(self, stage: Stage, suffix: str = "") -> dict | None:
        try:
            return json.loads((self.folder / f"{stage.marker_name()}{suffix}.json").read_text())
        except (OSError, ValueError):
            return None

    def write(self, stage: Stage, record: dict, suffix: str = "") -> None:
        atomic_write_text(self.folder / f"{stage.marker_name()}{suffix}.json", json.dumps(record, indent=2, default=str))

    def remove(self, stage: Stage, suffix: str = "") -> None:
        (self.folder / f"{stage.marker_name()}{suffix}.json").unlink(missing_ok=True)


def stage_key(plan: Plan, stage: Stage, state: State) -> str | None:
    """The fingerprint of what `stage` would run: its commands (paths relative to OUT and the
    repository) and when each stage it depends on finished; None while a dependency is not done."""
    finished = {}
    for dep in stage.deps:
        marker = state.read(plan.stages[dep])
        if marker is None:
            return None
        finished[dep] = marker["finished"]

    def normal(args: list) -> list[str]:
        kept, skip = [], False
        for a in map(str, args):
            if skip:
                skip = False
                continue
            if a in VOLATILE_FLAGS:
                skip = True
                continue
            kept.append(a.replace(str(plan.out), "$OUT").replace(str(REPO_ROOT), "$REPO"))
        return kept

    commands = [[c.script, *normal(c.args)] for c in stage.commands]
    return fingerprint({"commands": commands, "deps": finished, "work": stage.info.get("work")})


def stage_status(plan: Plan, stage: Stage, state: State, force: bool) -> str:
    """done (a matching record and every output), resume (a distillation with a checkpoint of the
    same command), or run."""
    key = stage_key(plan, stage, state)
    marker = state.read(stage)
    if not force and key is not None and marker is not None and marker.get("key") == key and \
            all((stage.folder / o).exists() for o in stage.outputs):
        return "done"
    if stage.kind == "distil" and not force and key is not None:
        started = state.read(stage, ".started")
        if started and started.get("key") == key and has_checkpoint(stage.folder):
            return "resume"
    return "run"


def has_checkpoint(dump_path: Path) -> bool:
    """Whether causal_train.py left a complete checkpoint (one with its manifest) in `dump_path`."""
    return any((c / "manifest.json").is_file() for c in dump_path.glob("checkpoint-*"))


# --- running -----------------------------------------------------------------------------------
class Runner:
    """Runs the stages in order, skipping finished ones; fine-tuning stages `jobs` at a time."""

    def __init__(self, plan: Plan, force: bool, jobs: int, progress_interval: float):
        self.plan = plan
        self.out = plan.out
        self.state = State(plan.out)
        self.force = force
        self.jobs = jobs
        self.progress_interval = progress_interval
        self.logs = plan.out / "logs"
        self.commands_file = plan.out / "commands.sh"
        self.lock = threading.Lock()
        self.procs: set = set()
        self.stop_signal: int | None = None
        self.device = device_description(plan.gpus)
        self.ran: list[str] = []
        self.skipped: list[str] = []
        gpu_ids = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.gpu_ids = [g.strip() for g in gpu_ids.split(",") if g.strip()] if gpu_ids else \
            [str(i) for i in range(plan.gpus)]
        self.env = dict(os.environ, **CHILD_ENV)
        if plan.tiny:
            self.env.update(OFFLINE_ENV)

    # signals
    def on_signal(self, signum, _frame) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
            logger.warning("%s: stopping the running commands (each finishes its step and checkpoints where it "
                           "can); run the same command again to continue", signal.Signals(signum).name)
        with self.lock:
            for proc in list(self.procs):
                if proc.poll() is None:
                    try:
                        proc.send_signal(signal.SIGTERM)
                    except OSError:
                        pass

    def header(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.commands_file, "a", encoding="utf-8") as fh:
            fh.write(f"# {dt.datetime.now().isoformat(timespec='seconds')}: "
                     f"{shlex.join(['python', 'scripts/reproduce.py', *sys.argv[1:]])}\n"
                     f"cd {shlex.quote(str(REPO_ROOT))}\n"
                     + "".join(f"export {k}={v}\n" for k, v in CHILD_ENV.items())
                     + ("".join(f"export {k}={v}\n" for k, v in OFFLINE_ENV.items()) if self.plan.tiny else ""))

    def record_command(self, text: str) -> None:
        with self.lock, open(self.commands_file, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")

    def run_command(self, stage: Stage, command: CommandLine, extra: tuple, env: dict) -> float:
        """Run one command, its output to logs/<command.log>.log; progress lines every progress_interval seconds."""
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)
        shown = command.shown(extra)
        prefix = f"CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']} " if "CUDA_VISIBLE_DEVICES" in env and \
            env.get("CUDA_VISIBLE_DEVICES") != self.env.get("CUDA_VISIBLE_DEVICES") else ""
        self.record_command(prefix + shown)
        log_path = self.logs / f"{command.log}.log"
        start = time.time()
        last_report = start
        total = step = None  # from causal_train.py's log lines
        bar = (None, 0)  # the tqdm bar with the largest total (a training loop's, rather than a save's)
        speed = None
        with open(log_path, "ab") as log:
            log.write(f"\n$ {prefix}{shown}\n".encode())
            log.flush()
            proc = subprocess.Popen(command.argv(extra), cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            with self.lock:
                self.procs.add(proc)
            try:
                tail = b""
                while chunk := os.read(proc.stdout.fileno(), 65536):
                    log.write(chunk)
                    text = (tail + chunk).decode("utf-8", errors="replace")
                    tail = chunk[-200:]
                    if (m := TOTAL_LINE.search(text)):
                        total = int(m.group(1))
                    for m in STEP_LINE.finditer(text):
                        step, speed = int(m.group(1)), float(m.group(2))
                    for m in PROGRESS_TQDM.finditer(text):
                        if int(m.group(2)) >= bar[1]:
                            bar = (int(m.group(1)), int(m.group(2)))
                    now = time.time()
                    if now - last_report >= self.progress_interval:
                        last_report = now
                        log.flush()
                        shown_step, shown_total = (step, total) if total else bar
                        self.report_progress(stage, shown_step, shown_total, speed, now - start)
                rc = proc.wait()
            finally:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait()
                with self.lock:
                    self.procs.discard(proc)
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)
        if rc != 0:
            lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-12:]
            raise StageFailed(f"{stage.title}: {command.script} exited with status {rc}; its output is in {log_path}, "
                              f"ending with:\n" + "\n".join("    " + line[-300:] for line in lines)
                              + f"\nThe command was:\n  {prefix}{shown}")
        stage.info["last_speed"] = speed
        return time.time() - start

    def report_progress(self, stage: Stage, step, total, speed, elapsed: float) -> None:
        parts = [f"{stage.title}: running for {format_seconds(elapsed)}"]
        if step is not None and total:
            parts.append(f"step {step} of {total} ({100 * step / total:.0f}%)")
            if step > 0:
                parts.append(f"about {format_seconds(elapsed * (total - step) / step)} left")
        if speed:
            parts.append(f"{speed:,.0f} tok/s")
        logger.info("%s", ", ".join(parts))

    def run_stage(self, stage: Stage, index: int, count: int, slot: int = 0) -> None:
        status = stage_status(self.plan, stage, self.state, self.force)
        if status == "done":
            self.skipped.append(stage.id)
            logger.info("[%d/%d] %s: done already, skipping", index, count, stage.title)
            return
        key = stage_key(self.plan, stage, self.state)
        if key is None:
            missing = [d for d in stage.deps if self.state.read(self.plan.stages[d]) is None]
            raise StageFailed(f"{stage.title}: needs {', '.join(missing)}, not done yet")
        logger.info("[%d/%d] %s%s", index, count, stage.title, " (resuming from its last checkpoint)"
                    if status == "resume" else "")
        self.state.remove(stage)
        env = dict(self.env)
        if self.plan.gpus and stage.phase == "finetune" and self.jobs > 1:
            env["CUDA_VISIBLE_DEVICES"] = self.gpu_ids[slot % len(self.gpu_ids)]
        if self.plan.gpus == 0:
            threads = max(1, self.plan.args.threads // (self.jobs if stage.phase == "finetune" else 1))
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        start = time.time()
        extra: tuple = ()
        if stage.kind == "distil":
            extra = ("--resume",) if status == "resume" else ("--force",)
            if status == "run" and has_checkpoint(stage.folder):
                logger.warning("%s: the checkpoints in %s were written by another command (another config, number of "
                               "GPUs or precision): starting afresh", stage.title, stage.folder)
            self.state.write(stage, {"key": key, "started": now_iso()}, ".started")
        elif stage.kind == "finetune" and (stage.folder / "train_results.json").exists():
            extra = ("--overwrite_output_dir",)  # a finished training whose stage did not finish: train afresh
        result = {}
        if stage.work is not None:
            self.record_command(f"# in scripts/reproduce.py: {stage.info['work']}")
            result = stage.work(stage.folder) or {}
        for command in stage.commands:
            self.run_command(stage, command, extra if command is stage.commands[0] else (), env)
        missing = [o for o in stage.outputs if not (stage.folder / o).exists()]
        if missing:
            raise StageFailed(f"{stage.title}: finished without writing {', '.join(missing)} in {stage.folder}")
        if stage.kind == "finetune":
            for checkpoint in stage.folder.glob("checkpoint-*"):  # the results are what the tables need
                shutil.rmtree(checkpoint, ignore_errors=True)
        seconds = time.time() - start
        gpus = (self.plan.processes if stage.phase == "distil" else 1) if self.plan.gpus else 0
        self.state.write(stage, {"stage": stage.id, "key": key, "seconds": round(seconds, 2), "finished": now_iso(),
                                 "device": self.device, "gpus": gpus, "resumed": status == "resume",
                                 "speed_tok_s": stage.info.get("last_speed"), **result})
        self.state.remove(stage, ".started")
        self.ran.append(stage.id)
        logger.info("[%d/%d] %s: done in %s", index, count, stage.title, format_seconds(seconds))

    def run(self, stages: list[Stage]) -> None:
        self.header()
        sequential = [s for s in stages if s.phase != "finetune"]
        parallel = [s for s in stages if s.phase == "finetune"]
        count = len(stages)
        for i, stage in enumerate(sequential, 1):
            self.run_stage(stage, i, count)
        if not parallel:
            return
        if self.jobs == 1:
            for i, stage in enumerate(parallel, len(sequential) + 1):
                self.run_stage(stage, i, count)
            return
        free = list(range(self.jobs))
        pending = list(enumerate(parallel, len(sequential) + 1))
        running = {}
        errors = []
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            while pending or running:
                while pending and free and not errors and self.stop_signal is None:
                    i, stage = pending.pop(0)
                    slot = free.pop(0)
                    running[pool.submit(self.run_stage, stage, i, count, slot)] = slot
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    free.append(running.pop(future))
                    if future.exception() is not None:
                        errors.append(future.exception())
        if errors:
            raise errors[0]


def emit(text: str) -> None:
    """Print `text` to stdout; a closed pipe (`| head`) ends the program quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def now_iso() -> str:
    return dt.datetime.now().isoformat(timespec="seconds")


