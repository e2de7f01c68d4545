"""Distil a student from a teacher with the standard and the causal (DIITO) objectives.

Parse, build, check, train, save. Single process (one GPU or the CPU) or
`torchrun --nproc_per_node N causal_train.py ...` (DDP, one node or several).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from causal_distiller import NonFiniteLoss, Preempted
from checkpoints import CHECKPOINT_PREFIX, checkpoint_problem, find_resume_checkpoint, list_checkpoints
from distill_setup import build, build_parser, sanity_checks
from atomic_files import clean_stale_temporaries
from devices import cpu_bf16_warning, init_gpu_params, set_seed, tune_cpu_allocator
from run_lock import RunLock
from run_records import git_log, save_args
from utils import check_output_parent, check_writable, CliError, logger, require_file, run_cli


def main(argv=None) -> None:
    args = build_parser(__doc__).parse_args(argv)
    sanity_checks(args)
    tune_cpu_allocator()
    init_gpu_params(args)
    if args.fp16 and args.device.type != "cuda":
        raise CliError("--fp16 needs a CUDA device; use --bf16 on the CPU")
    if args.bf16 and args.device.type == "cpu" and (warning := cpu_bf16_warning()):
        logger.warning("--bf16: %s", warning)
    set_seed(args.seed)
    # Every input is checked before anything is written (or, with --force, moved aside).
    check_dump_path(args)
    resume = checkpoint_to_resume(args)
    run = build(args)
    if resume is not None:
        run.distiller.load_checkpoint(resume)
    # Checks passed: now write.
    aside, created, lock = None, not Path(args.dump_path).exists(), None
    if args.is_master:
        # One run at a time in a dump path: taken before anything there is moved or written.
        lock = RunLock(args.dump_path, "--dump_path").acquire()
    try:
        if args.is_master:
            aside = prepare_dump_path(args)
            run.distiller.on_checkpoint = lambda target: _drop_replaced(aside, target)
            save_args(args, args.dump_path)
            git_log(args.dump_path)
            run.student.config.save_pretrained(args.dump_path)
        _train(args, run, resume, aside, created)
    finally:
        if lock is not None:
            lock.release()
        if args.multi_gpu:
            import gc

            import torch.distributed as dist

            # The models, DDP's reducer and FSDP's state go before the process group: freed after it (at
            # exit), a rank now and then aborted in their destructors ("terminate called without an active
            # exception") after a run that had finished and saved its student.
            run = None  # noqa: F841 -- (the last reference)
            gc.collect()
            if dist.is_initialized():
                dist.destroy_process_group()


def _train(args, run, resume, aside: Path | None, created: bool) -> None:
    """Train; on a stop (signal, non-finite loss, error) say what is left and how to continue."""
    distiller = run.distiller
    try:
        distiller.train()
    except Preempted as stop:
        if args.is_master and _undo_failed_start(args, aside, created, why=f"stopped by signal {stop.signum}"):
            logger.error("stopped by signal %d before this run's first checkpoint; run the same command again to "
                         "start it", stop.signum)
        else:
            logger.error("stopped by signal %d; resume with the same command plus --resume (it continues from %s)",
                         stop.signum, _newest(args.dump_path))
        sys.exit(128 + stop.signum)
    except NonFiniteLoss as err:
        if distiller.n_step == 0:  # nothing trained: the initial state is no checkpoint worth writing
            if args.is_master:
                _undo_failed_start(args, aside, created, why="a non-finite loss at its first step")
                logger.error("%s; no step was trained, so no checkpoint is written: check the hyper-parameters "
                             "(--learning_rate, --temperature, --alpha_*)", err)
            sys.exit(3)
        target = distiller.save_checkpoint() if distiller.last_checkpoint_step != distiller.n_step else \
            _newest(args.dump_path)
        if args.is_master:
            logger.error("%s; the last good state is in %s", err, target)
        sys.exit(3)
    except BaseException:
        if args.is_master and resume is None:
            _undo_failed_start(args, aside, created, why="an error")
        raise


def _newest(dump_path) -> Path | str:
    found = list_checkpoints(Path(dump_path))
    return found[-1] if found else f"the newest sound checkpoint in {dump_path}"


def checkpoint_to_resume(args) -> Path | None:
    """The checkpoint --resume_from names (checked sound), the newest sound one with --resume, or None."""
    if args.resume_from:
        resume = Path(args.resume_from)
        problem = checkpoint_problem(resume)
        if problem:
            raise CliError(f"--resume_from {resume} is damaged or incomplete: {problem}")
        return resume
    if args.resume:
        try:
            return find_resume_checkpoint(args.dump_path)
        except CliError as err:
            note = replaced_note(Path(args.dump_path))
            raise CliError(f"{err}{note}") from None
    return None


def replaced_path(path: Path) -> Path:
    """Where --force keeps the previous contents of --dump_path `path` until the new run's first checkpoint."""
    path = Path(path)
    return path.with_name(f".{path.name}.replaced")


def replaced_note(path: Path) -> str:
    """A sentence naming the hidden folder a killed --force run left (the run it replaced), or ''."""
    aside = replaced_path(path)
    if not aside.is_dir() or progress_checkpoints(path):
        return ""
    return (f". The run that an earlier --force replaced is kept in {aside} (that --force run stopped before its "
            f"first checkpoint): run the --force command again to start the new run (the previous one stays in "
            f"{aside} until the new run's first checkpoint), or move {aside} back to {path} to keep the previous run")


def progress_checkpoints(path: Path) -> list[Path]:
    """The complete checkpoints of `path` past step 0 (a run's own progress), oldest first."""
    return [c for c in list_checkpoints(Path(path)) if int(c.name[len(CHECKPOINT_PREFIX):]) > 0]


def check_dump_path(args) -> None:
    """Refuse an unusable --dump_path before any work (nothing is written here)."""
    path = check_output_parent(args.dump_path, "--dump_path", is_file=False)
    check_writable(path, "--dump_path")
    if args.resume_from:
        folder = require_file(args.resume_from, "--resume_from")
        if not folder.is_dir():
            raise CliError(f"--resume_from {folder} is not a checkpoint folder")
    elif args.resume:
        if not path.is_dir():
            raise CliError(f"--resume: {path} does not exist (nothing to resume){replaced_note(path)}")
    else:
        if args.force and (path.exists() or replaced_path(path).exists()):
            here = Path.cwd().resolve()
            target = path.resolve()
            if target == here or target in here.parents or target.parent == target:
                raise CliError(f"--dump_path {args.dump_path} with --force: {target} is the current folder or holds "
                               f"it; --force moves the old contents aside, so give the run its own folder")
        if not args.force and path.exists() and any(path.iterdir()):
            found = list_checkpoints(path)
            cont = f" (from {found[-1]})" if found else ""
            raise CliError(f"--dump_path {path} already exists; add --force to overwrite or --resume to continue"
                           f"{cont}{replaced_note(path)}")
        if not args.force and replaced_note(path):
            raise CliError(f"--dump_path {path}{replaced_note(path)[1:]}")


def prepare_dump_path(args) -> Path | None:
    """Create --dump_path (after every check passed). With --force, move its old contents aside.

    Returns the folder holding the previous run's contents (to delete once this run has a
    checkpoint past step 0, or to restore if it stops before), or None. Also removes the
    temporaries that an interrupted write left in --dump_path.
    """
    path = Path(args.dump_path)
    aside = replaced_path(path)
    if aside.exists() and progress_checkpoints(path):
        # The run that replaced it has progressed (it was stopped while removing it): it is no longer needed.
        shutil.rmtree(aside)
        logger.info("removed %s, the run an earlier --force replaced (its successor in %s has a checkpoint)",
                    aside, path)
    if args.resume or args.resume_from:
        aside = None
    elif aside.exists():  # left by a --force run stopped before its first checkpoint: the older run stays aside
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("--force: %s still holds the run an earlier --force replaced; it is kept there until this "
                       "run writes its first checkpoint", aside)
    elif path.exists() and any(path.iterdir()):
        os.replace(path, aside)
        logger.warning("--force: the previous contents of %s are kept in %s until this run writes its first "
                       "checkpoint", path, aside)
    else:
        aside = None
    path.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    legacy = path / ".final"  # an empty folder older versions left behind
    if legacy.is_dir() and not any(legacy.iterdir()):
        legacy.rmdir()
    return aside


def _drop_replaced(aside: Path | None, target: Path) -> None:
    """Once this run has a checkpoint past step 0, the run --force replaced is no longer needed."""
    if aside is None or not aside.exists() or int(Path(target).name[len(CHECKPOINT_PREFIX):]) == 0:
        return
    shutil.rmtree(aside, ignore_errors=True)
    logger.info("--force: removed the previous contents (%s)", aside)


def _undo_failed_start(args, aside: Path | None, created: bool, why: str) -> bool:
    """A run that stops before its first checkpoint past step 0 leaves --dump_path as it found it.

    Returns True when the previous contents (moved aside by --force) were put back."""
    path = Path(args.dump_path)
    if aside is not None and aside.exists():
        shutil.rmtree(path, ignore_errors=True)
        os.replace(aside, path)
        logger.warning("this run stopped (%s) before its first checkpoint: the previous contents of %s are "
                       "restored", why, path)
        return True
    if created and not list_checkpoints(path):
        shutil.rmtree(path, ignore_errors=True)
    return False


if __name__ == "__main__":
    run_cli(main)
