"""A distillation run's --dump_path through its life: checked before anything is written, locked while the run
writes, and with --force the previous run kept aside until this run has a checkpoint of its own.

- Without --force or --resume, an existing non-empty folder is refused; with --force too, unless a run of
  causal_train.py wrote it (a user's folder is never replaced).
- A --dump_path that is a link is followed: the folder it names is the run's.
- --force moves the previous contents to `.<name>.replaced` beside the folder; they are removed once this run
  writes a checkpoint past step 0, and put back if it stops before.
- --resume continues from the newest sound checkpoint; --resume_from from the one it names.
- One run at a time: a lock beside the folder (`run_lock.RunLock`), named in the error a second run gets.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from atomic_files import clean_stale_temporaries
from checkpoints import CHECKPOINT_PREFIX, checkpoint_problem, find_resume_checkpoint, list_checkpoints
from run_lock import RunLock
from run_records import git_log, save_args
from utils import CliError, check_output_parent, check_writable, logger, require_file


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


def written_by_a_run(path: Path) -> bool:
    """Whether folder `path` is a run's --dump_path: a run records its arguments (parameters.json) before anything
    else, and any complete checkpoint says so too. (A user's folder that happens to hold a parameters.json of
    another tool is not taken for one.)"""
    if list_checkpoints(path):
        return True
    try:
        record = json.loads((path / "parameters.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"dump_path", "teacher_name", "student_type"} <= set(record)


def newest_checkpoint(dump_path) -> Path | str:
    """The newest complete checkpoint of `dump_path`, or words for it when there is none yet."""
    found = list_checkpoints(Path(dump_path))
    return found[-1] if found else f"the newest sound checkpoint in {dump_path}"


class RunFolder:
    """The --dump_path of one run (the flags --dump_path, --force, --resume, --resume_from of `args`)."""

    def __init__(self, args, is_master: bool):
        given = Path(args.dump_path)
        # A link is followed: the run's folder, its lock and --force's copy aside are those of the folder it names
        self.path = given.resolve() if given.is_symlink() else given
        if self.path != given and is_master:
            logger.info("--dump_path %s is a link to %s: the run writes there", given, self.path)
        self.force, self.resume, self.resume_from = args.force, args.resume, args.resume_from
        self.is_master = is_master
        self.created = not self.path.exists()  # (a run that fails at once removes a folder it made)
        self.aside: Path | None = None  # the previous run, moved aside by --force

    # --- before anything is written ----------------------------------------------------------------
    def check(self) -> Path | None:
        """Refuse an unusable --dump_path (nothing is written here); returns the checkpoint to resume from, if any."""
        path = check_output_parent(self.path, "--dump_path", is_file=False)
        check_writable(path, "--dump_path")
        if self.resume_from:
            folder = require_file(self.resume_from, "--resume_from")
            if not folder.is_dir():
                raise CliError(f"--resume_from {folder} is not a checkpoint folder")
        elif self.resume:
            if not path.is_dir():
                raise CliError(f"--resume: {path} does not exist (nothing to resume){replaced_note(path)}")
        else:
            self._check_new(path)
        return self._checkpoint_to_resume()

    def _check_new(self, path: Path) -> None:
        if self.force and (path.exists() or replaced_path(path).exists()):
            here = Path.cwd().resolve()
            target = path.resolve()
            if target == here or target in here.parents or target.parent == target:
                raise CliError(f"--dump_path {self.path} with --force: {target} is the current folder or holds it; "
                               f"--force moves the old contents aside, so give the run its own folder")
        if self.force and path.is_dir() and any(path.iterdir()) and not written_by_a_run(path):
            found = sorted(p.name for p in path.iterdir())
            raise CliError(f"--dump_path {path} holds files no run of causal_train.py wrote ({', '.join(found[:3])}"
                           f"{', ...' if len(found) > 3 else ''}): --force replaces only a run's folder; give an "
                           f"empty or new folder")
        if not self.force and path.exists() and any(path.iterdir()):
            found = list_checkpoints(path)
            cont = f" (from {found[-1]})" if found else ""
            raise CliError(f"--dump_path {path} already exists; add --force to overwrite or --resume to continue"
                           f"{cont}{replaced_note(path)}")
        if not self.force and replaced_note(path):
            raise CliError(f"--dump_path {path}{replaced_note(path)[1:]}")

    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint --resume_from names (checked sound), the newest sound one with --resume, or None."""
        if self.resume_from:
            resume = Path(self.resume_from)
            problem = checkpoint_problem(resume)
            if problem:
                raise CliError(f"--resume_from {resume} is damaged or incomplete: {problem}")
            return resume
        if self.resume:
            try:
                return find_resume_checkpoint(self.path)
            except CliError as err:
                raise CliError(f"{err}{replaced_note(self.path)}") from None
        return None

    # --- while the run writes ----------------------------------------------------------------------
    @contextmanager
    def open(self, config, student_config) -> Iterator[None]:
        """On the master: take the lock (before anything there is moved or written), make the folder (moving the
        previous run aside with --force) and record the run (parameters.json, git_log.json, the student's
        config). The lock is released when the block ends."""
        lock = RunLock(self.path, "--dump_path").acquire() if self.is_master else None
        try:
            if self.is_master:
                self._prepare()
                save_args(config, self.path)
                git_log(self.path)
                student_config.save_pretrained(self.path)
            yield
        finally:
            if lock is not None:
                lock.release()

    def _prepare(self) -> None:
        """Create --dump_path (every check passed). With --force, move its old contents aside (`self.aside`, to
        delete once this run has a checkpoint past step 0, or to restore if it stops before). Also removes the
        temporaries an interrupted write left in it."""
        path, aside = self.path, replaced_path(self.path)
        if aside.exists() and progress_checkpoints(path):
            # The run that replaced it has progressed (it was stopped while removing it): it is no longer needed.
            shutil.rmtree(aside)
            logger.info("removed %s, the run an earlier --force replaced (its successor in %s has a checkpoint)",
                        aside, path)
        self.aside = None
        if self.resume or self.resume_from:
            pass
        elif aside.exists():  # left by a --force run stopped before its first checkpoint: the older run stays aside
            shutil.rmtree(path, ignore_errors=True)
            logger.warning("--force: %s still holds the run an earlier --force replaced; it is kept there until this "
                           "run writes its first checkpoint", aside)
            self.aside = aside
        elif path.exists() and any(path.iterdir()):
            os.replace(path, aside)
            logger.warning("--force: the previous contents of %s are kept in %s until this run writes its first "
                           "checkpoint", path, aside)
            self.aside = aside
        path.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(path)
        legacy = path / ".final"  # an empty folder older versions left behind
        if legacy.is_dir() and not any(legacy.iterdir()):
            legacy.rmdir()

    def on_checkpoint(self, target: Path) -> None:
        """Once this run has a checkpoint past step 0, the run --force replaced is no longer needed."""
        aside = self.aside
        if aside is None or not aside.exists() or int(Path(target).name[len(CHECKPOINT_PREFIX):]) == 0:
            return
        shutil.rmtree(aside, ignore_errors=True)
        logger.info("--force: removed the previous contents (%s)", aside)

    def undo_failed_start(self, why: str) -> bool:
        """A run that stops before its first checkpoint past step 0 leaves --dump_path as it found it.

        Returns True when the previous contents (moved aside by --force) were put back."""
        path, aside = self.path, self.aside
        if aside is not None and aside.exists():
            shutil.rmtree(path, ignore_errors=True)
            os.replace(aside, path)
            logger.warning("this run stopped (%s) before its first checkpoint: the previous contents of %s are "
                           "restored", why, path)
            return True
        if self.created and not list_checkpoints(path):
            shutil.rmtree(path, ignore_errors=True)
        return False
