"""Distil a student from a teacher with the standard and the causal (DIITO) objectives.

Parse, build, train, save. Single process (one GPU or the CPU) or
`torchrun --nproc_per_node N causal_train.py ...` (DDP, one node or several).
"""
from __future__ import annotations

import sys

from causal_distiller import NonFiniteLoss, Preempted
from devices import end_process_group
from distill_setup import build, build_parser, sanity_checks, start_runtime
from run_folder import RunFolder, newest_checkpoint
from utils import logger, run_cli


def main(argv=None) -> None:
    args = build_parser(__doc__).parse_args(argv)
    sanity_checks(args)
    runtime = start_runtime(args)
    folder = RunFolder(args, runtime.is_master)
    resume = folder.check()  # every input is checked before anything is written (or, with --force, moved aside)
    run = build(args, runtime)
    try:
        if resume is not None:
            run.distiller.load_checkpoint(resume)
        run.distiller.on_checkpoint = folder.on_checkpoint
        with folder.open(run.config, run.student.config):
            train(run.distiller, folder, resumed=resume is not None)
    finally:
        run = None  # noqa: F841 -- the models, DDP's reducer and FSDP's state go before the process group
        if runtime.multi_gpu:
            end_process_group()


def train(distiller, folder: RunFolder, resumed: bool) -> None:
    """Train and save the student; on a stop (signal, non-finite loss, error) say what is left and how to go on."""
    try:
        distiller.train()
    except Preempted as stop:
        if folder.is_master and folder.undo_failed_start(why=f"stopped by signal {stop.signum}"):
            logger.error("stopped by signal %d before this run's first checkpoint; run the same command again to "
                         "start it", stop.signum)
        else:
            logger.error("stopped by signal %d; resume with the same command plus --resume (it continues from %s)",
                         stop.signum, newest_checkpoint(folder.path))
        sys.exit(128 + stop.signum)
    except NonFiniteLoss as err:
        if distiller.n_step == 0:  # nothing trained: the initial state is no checkpoint worth writing
            if folder.is_master:
                folder.undo_failed_start(why="a non-finite loss at its first step")
                logger.error("%s; no step was trained, so no checkpoint is written: check the hyper-parameters "
                             "(--learning_rate, --temperature, --alpha_*)", err)
            sys.exit(3)
        target = distiller.save_checkpoint() if distiller.last_checkpoint_step != distiller.n_step else \
            newest_checkpoint(folder.path)
        if folder.is_master:
            logger.error("%s; the last good state is in %s", err, target)
        sys.exit(3)
    except BaseException:
        if folder.is_master and not resumed:
            folder.undo_failed_start(why="an error")
        raise


if __name__ == "__main__":
    run_cli(main)
