"""Shared test fixtures: offline environment, a local WordPiece tokenizer, a small real-prose corpus, and the
one tiny distillation set-up (teacher, student, corpus, counts, mapping) every causal_train.py test uses.

`ROOT` is the repository root (import it: `from conftest import ROOT`). End-to-end runs (the
quickstarts, DDP, the long fault-injection runs) carry the `e2e` marker: `pytest -m "not e2e"` is
the fast loop, `pytest tests` runs everything.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

# Never touch a model or dataset hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
# The repository's modules are installed (`pip install -r requirements.txt` ends with `-e .`); the tests also
# import the commands of scripts/ and bench/ (their parsers, their main), which are files, not modules.
for p in (ROOT / "scripts", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as in the subprocesses it is compared with: bitwise equality needs the
    same kernels."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`../shared/fixtures`, or skip when the folder is absent (a user's fresh clone)."""
    path = SHARED / "fixtures"
    if not path.is_dir():
        pytest.skip("../shared/fixtures is absent")
    return path


@pytest.fixture(scope="session")
def corpus_lines() -> list[str]:
    """About 2,000 paragraphs of English prose from the standard library's docstrings."""
    from doc_corpus import stdlib_documents

    return stdlib_documents()


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, corpus_lines) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(corpus_lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_lines) -> Path:
    """A BERT-style uncased WordPiece tokenizer (about 2,000 entries) trained on the corpus, saved as an HF folder."""
    from helpers import train_wordpiece

    return train_wordpiece(corpus_lines, tmp_path_factory.mktemp("tokenizer"), vocab_size=2000)


# Documents of the corpus in the distillation set-up: about 36 batches of 8 per epoch after cleaning.
DISTILL_DOCUMENTS = 300


@pytest.fixture(scope="session")
def distill_setup(tmp_path_factory, tokenizer_dir, corpus_lines) -> dict:
    """Everything causal_train.py needs, built once, small and local (`helpers.make_distill_setup`): a 4-layer
    BERT teacher with its tokenizer, a binarized corpus of the first DISTILL_DOCUMENTS documents, token
    counts, a 2-layer DistilBERT student config and weights, a 2-entry neuron mapping. Read-only: copy before
    changing a file."""
    from helpers import make_distill_setup

    return make_distill_setup(tmp_path_factory.mktemp("distill"), tokenizer_dir, corpus_lines[:DISTILL_DOCUMENTS])


# The longest files first: pytest-xdist (pytest.ini: two workers, a file each) then starts them at once and
# fills the gaps with the short ones, instead of finishing on one long file while the other worker idles.
LONGEST_FIRST = ("test_quickstart.py", "test_quickstart_clm.py", "test_fsdp.py", "test_reproduce.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # (stable: the rest keep their order)


@pytest.fixture(scope="module")
def three_steps(distill_setup, tmp_path_factory):
    """A finished 3-step run with checkpoint-1, -2 and -3 (read-only: copy it)."""
    import causal_train
    from helpers import checkpointed_argv

    dump = tmp_path_factory.mktemp("trust") / "run"
    causal_train.main(checkpointed_argv(distill_setup, dump, 3))
    return dump


@pytest.fixture
def run_copy(three_steps, tmp_path):
    """A copy of `three_steps` the test may change."""
    dump = tmp_path / "run"
    shutil.copytree(three_steps, dump)
    return dump


@pytest.fixture(scope="module")
def model_without_tokenizer(tmp_path_factory, distill_setup) -> Path:
    """The teacher's weights and config without its tokenizer files, as a student folder is."""
    folder = tmp_path_factory.mktemp("no_tokenizer")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(distill_setup["teacher"] / name, folder / name)
    return folder
