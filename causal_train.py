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
from checkpoints import checkpoint_problem, find_resume_checkpoint, list_checkpoints
from distill_setup import build, build_parser, sanity_checks
from utils import (CliError, check_output_parent, clean_stale_temporaries, cpu_bf16_warning, git_log, init_gpu_params,
                   logger, require_file, run_cli, save_args, set_seed, tune_cpu_allocator)


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
    aside, created = None, not Path(args.dump_path).exists()
    if args.is_master:
        aside = prepare_dump_path(args)
        run.distiller.on_checkpoint = lambda _target: _drop_replaced(aside)
        save_args(args, args.dump_path)
        git_log(args.dump_path)
        run.student.config.save_pretrained(args.dump_path)
    try:
        run.distiller.train()
    except Preempted as stop:
        logger.error("stopped by signal %d; resume with the same command plus --resume", stop.signum)
        sys.exit(128 + stop.signum)
    except NonFiniteLoss as err:
        logger.error("%s", err)
        run.distiller.save_checkpoint()
        sys.exit(3)
    except BaseException:
        if args.is_master and resume is None:
            _undo_failed_start(args, aside, created)
        raise
    finally:
        if args.multi_gpu:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def checkpoint_to_resume(args) -> Path | None:
    """The checkpoint --resume_from names (checked sound), the newest sound one with --resume, or None."""
    if args.resume_from:
        resume = Path(args.resume_from)
        problem = checkpoint_problem(resume)
        if problem:
            raise CliError(f"--resume_from {resume} is damaged or incomplete: {problem}")
        return resume
    if args.resume:
        return find_resume_checkpoint(args.dump_path)
    return None


def check_dump_path(args) -> None:
    """Refuse an unusable --dump_path before any work (nothing is written here)."""
    path = check_output_parent(args.dump_path, "--dump_path", is_file=False)
    if args.resume_from:
        folder = require_file(args.resume_from, "--resume_from")
        if not folder.is_dir():
            raise CliError(f"--resume_from {folder} is not a checkpoint folder")
    elif args.resume:
        if not path.is_dir():
            raise CliError(f"--resume: {path} does not exist (nothing to resume)")
    elif path.exists() and any(path.iterdir()) and not args.force:
        raise CliError(f"--dump_path {path} already exists; add --force to overwrite or --resume to continue")


def prepare_dump_path(args) -> Path | None:
    """Create --dump_path (after every check passed). With --force, move its old contents aside.

    Returns the folder holding the previous run's contents (to delete once this run has a
    checkpoint, or to restore if it fails before), or None. Also removes the temporaries that an
    interrupted write left in --dump_path.
    """
    path = Path(args.dump_path)
    aside = None
    if not (args.resume or args.resume_from) and path.exists() and any(path.iterdir()):
        aside = path.with_name(f".{path.name}.replaced")
        if aside.exists():  # left by a --force run killed before its first checkpoint
            if list_checkpoints(path):
                shutil.rmtree(aside)
            else:  # the newer contents hold no checkpoint: the older run stays aside
                shutil.rmtree(path)
        if path.exists():
            os.replace(path, aside)
        logger.warning("--force: the previous contents of %s are kept in %s until this run writes its first "
                       "checkpoint", path, aside)
    path.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    legacy = path / ".final"  # an empty folder older versions left behind
    if legacy.is_dir() and not any(legacy.iterdir()):
        legacy.rmdir()
    return aside


def _drop_replaced(aside: Path | None) -> None:
    if aside is not None and aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("--force: removed the previous contents (%s)", aside)


def _undo_failed_start(args, aside: Path | None, created: bool) -> None:
    """A run that fails before its first checkpoint leaves --dump_path as it found it."""
    path = Path(args.dump_path)
    if list_checkpoints(path):
        return
    if aside is not None and aside.exists():
        shutil.rmtree(path, ignore_errors=True)
        os.replace(aside, path)
        logger.warning("the run failed before its first checkpoint: the previous contents of %s are restored", path)
    elif created:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    run_cli(main)
