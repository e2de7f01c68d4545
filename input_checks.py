"""Checks of what a user names as a model or tokenizer, shared by every script.

Two mistakes that otherwise cost minutes or give silent garbage:

* A local path with a typo. transformers treats a name it cannot find on disk as a hub repo id
  and retries the hub (about 30 s offline) before a repo-id error that never says "folder".
  `check_local_path` says "no such folder" at once.
* A tokenizer that does not belong to the model. transformers 5 builds a tokenizer of only its
  special tokens from a model folder that holds no tokenizer files (a student folder), and every
  word becomes [UNK]: training and evaluation then run, exit 0 and report nonsense.
  `check_tokenizer` compares the tokenizer with the model's vocabulary and special ids.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from utils import CliError

# A hub repo id: "name" or "owner/name" (letters, digits, - _ .), as huggingface_hub validates it.
_REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")
# The model's special ids that a tokenizer must agree with, when the config sets them.
_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
# A tokenizer may be a little smaller than the model's vocabulary (models pad the embedding
# matrix to a round size: 151,936 rows for 151,665 tokens); much smaller means another tokenizer.
MIN_COVERAGE = 0.9


def looks_local(name: str) -> bool:
    """Whether `name` is meant as a path on disk rather than a hub repo id.

    Local: starts with `/`, `.` or `~`; holds a backslash or two or more `/`; ends with `/`; or is
    `a/b` where `a` is an existing folder. `owner/name` with no folder `owner` here may be a hub id.
    """
    name = str(name)
    if name.startswith(("/", ".", "~")) or "\\" in name or name.endswith("/") or name.count("/") >= 2:
        return True
    if "/" in name:
        return Path(name.split("/", 1)[0]).expanduser().is_dir()
    return not _REPO_ID.match(name)


def check_local_path(name: str | os.PathLike | None, flag: str) -> None:
    """CliError "`flag` `name`: no such folder" when `name` looks local (see `looks_local`) and does not exist."""
    if name is None:
        return
    name = str(name)
    if looks_local(name) and not Path(name).expanduser().exists():
        raise CliError(f"{flag} {name}: no such folder")


def _beyond(tokenizer, vocab_size: int, top: int, shown: int = 5) -> str:
    """Which of the tokenizer's entries lie beyond the model's vocabulary: "id 151665 '<|x|>' (added), ..." """
    ids = list(range(vocab_size, top + 1))
    try:
        names = tokenizer.convert_ids_to_tokens(ids[:shown])
    except Exception:  # noqa: BLE001 -- a tokenizer that cannot name its ids: the ids alone
        names = [None] * len(ids[:shown])
    added = set(getattr(tokenizer, "get_added_vocab", lambda: {})().values())
    parts = [f"id {i} {name!r}" + (" (an added token)" if i in added else "") for i, name in zip(ids, names)]
    more = f" and {len(ids) - shown} more" if len(ids) > shown else ""
    return f"the entr{'y' if len(ids) == 1 else 'ies'} beyond it: {', '.join(parts)}{more}"


def check_tokenizer(tokenizer, config=None, *, tokenizer_flag: str, tokenizer_name, model_name=None) -> None:
    """CliError naming `tokenizer_flag` when `tokenizer` cannot be the model's tokenizer.

    Without a `config`: the tokenizer must hold more than its special tokens. With the model's
    `config`: also no id beyond `config.vocab_size`, at least `MIN_COVERAGE` of the model's
    vocabulary covered, and the tokenizer's pad/bos/eos ids equal to the config's where both set
    them (a config id outside the vocabulary is ignored, as transformers warns about it anyway).
    """
    n_tokens = len(tokenizer)
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    fix = f"pass {tokenizer_flag} <the tokenizer the model was trained with>"
    if n_tokens <= len(special):
        where = " (a model folder without tokenizer files, such as a student folder, gives one)" if n_tokens <= 8 else ""
        raise CliError(
            f"{tokenizer_flag} {tokenizer_name}: the tokenizer holds only its {n_tokens} special token(s) and no "
            f"vocabulary{where}; every word would become unknown: {fix}"
        )
    if config is None:
        return
    vocab_size = getattr(config, "vocab_size", None)
    model = model_name or "the model"
    if vocab_size is None:
        return
    if n_tokens > vocab_size or max(special, default=-1) >= vocab_size:
        top = max(n_tokens - 1, max(special, default=-1))
        raise CliError(
            f"{tokenizer_flag} {tokenizer_name} has {n_tokens} entries (ids up to {top}) but {model} has vocab_size "
            f"{vocab_size}: {_beyond(tokenizer, vocab_size, top)}; they do not belong together, or a token was added "
            f"to the tokenizer and not to the model; {fix}"
        )
    if n_tokens < MIN_COVERAGE * vocab_size:
        raise CliError(
            f"{tokenizer_flag} {tokenizer_name} has {n_tokens} entries but {model} has vocab_size {vocab_size}: "
            f"most of the model's vocabulary would never be used, so this is not its tokenizer; {fix}"
        )
    for key in _SPECIAL_IDS:
        model_id = getattr(config, key, None)
        token_id = getattr(tokenizer, key, None)
        if not isinstance(model_id, int) or token_id is None or not 0 <= model_id < vocab_size:
            continue
        if int(token_id) != model_id:
            raise CliError(
                f"{tokenizer_flag} {tokenizer_name}: its {key} is {token_id} but {model} has {key} {model_id}: "
                f"they do not belong together; {fix}"
            )


def check_config_numbers(config, source: str) -> None:
    """CliError naming `source` when a number of a model config is NaN or infinite (`"dropout": NaN` in a hand-edited
    config.json loads without a word and fails at the first training step, deep in the model)."""
    for key, value in sorted(config.to_dict().items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise CliError(f"{source}: the config's {key} is {value}; give a finite number")
