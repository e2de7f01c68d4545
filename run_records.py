"""What a run records about itself: its arguments and the commit of the code that ran it."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from atomic_files import atomic_write_text
from utils import REPO_ROOT


def git_info(folder: str | os.PathLike = REPO_ROOT) -> dict:
    """The commit and branch of the checkout holding `folder`, read with the git CLI ({} outside git)."""

    def _git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=folder, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    sha = _git("rev-parse", "HEAD")
    if sha is None:
        return {}
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"repo_sha": sha, "branch": _git("rev-parse", "--abbrev-ref", "HEAD"), "dirty": bool(dirty)}


def git_log(folder_path: str | os.PathLike) -> None:
    """Write `git_log.json` (commit, branch, dirty flag) into `folder_path`."""
    atomic_write_text(Path(folder_path) / "git_log.json", json.dumps(git_info(), indent=2))


def save_args(params, folder: str | os.PathLike, name: str = "parameters.json") -> None:
    """Record the run's arguments (JSON-serialisable fields only) and the git commit in `folder`."""
    record = {k: v for k, v in sorted(vars(params).items()) if _jsonable(v)}
    record["git"] = git_info()
    atomic_write_text(Path(folder) / name, json.dumps(record, indent=2))


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True
