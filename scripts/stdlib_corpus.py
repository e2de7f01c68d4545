"""Assemble a small corpus of real English prose from the Python standard library's docstrings.

Every machine with Python has this text, so tests and the offline quickstart need no download and
the repository ships no data. Docstrings are cleaned of code examples (doctest lines, indented
blocks), reST markup and very short fragments; each remaining paragraph is one document.

Usage: python scripts/stdlib_corpus.py --out corpus.txt [--max_docs N]
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import pkgutil
import re
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from utils import atomic_write_text, logger, run_cli  # noqa: E402

# Pure-Python modules with substantial prose docstrings; importing them has no side effects.
DEFAULT_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bdb", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html", "http",
    "imaplib", "inspect", "ipaddress", "json", "logging", "lzma", "mailbox", "mimetypes",
    "multiprocessing", "netrc", "numbers", "operator", "optparse", "pathlib", "pdb", "pickle",
    "pickletools", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats",
    "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "turtle", "typing", "unittest", "urllib", "uuid", "warnings", "wave", "weakref",
    "xml", "zipfile", "zipimport",
)

_MARKUP = [
    (re.compile(r":[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`"), r"\1"),  # :func:`name` -> name
    (re.compile(r"``([^`]*)``"), r"\1"),
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"\*\*?([^*]+)\*\*?"), r"\1"),
    (re.compile(r"\s+"), " "),
]
_CODEY = re.compile(r"(>>>|\.\.\.\s|==|!=|->|\w\(\)|[{}\[\]<>=_#@$\\|])")


def _clean_paragraph(par: str) -> str | None:
    lines = par.splitlines()
    if any(line.startswith((" ", "\t")) for line in lines[1:]) and len(lines) > 1:
        return None  # an indented block: code or a table
    text = " ".join(line.strip() for line in lines)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    text = text.strip()
    words = text.split()
    if len(words) < 8 or len(_CODEY.findall(text)) > 0 or not text[0].isupper() or text[-1] not in ".?!":
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return text if letters / len(text) > 0.9 else None


def _docstrings(module_name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mod = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 -- a module missing on this Python is simply skipped
            return
    seen = set()
    stack = [mod]
    if hasattr(mod, "__path__"):
        for info in pkgutil.iter_modules(mod.__path__, mod.__name__ + "."):
            if info.name.split(".")[-1].startswith("_") or "test" in info.name:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    stack.append(importlib.import_module(info.name))
                except Exception:  # noqa: BLE001
                    continue
    for root in stack:
        objs = [root] + [obj for _, obj in sorted(vars(root).items()) if inspect.isclass(obj) or inspect.isfunction(obj)]
        for obj in list(objs):
            if inspect.isclass(obj):
                objs.extend(v for _, v in sorted(vars(obj).items()) if inspect.isfunction(v))
        for obj in objs:
            if getattr(obj, "__module__", root.__name__) != root.__name__ and obj is not root:
                continue
            doc = inspect.getdoc(obj) if not isinstance(obj, type(root)) else obj.__doc__
            if doc and doc not in seen:  # by text: ids of freed strings are reused
                seen.add(doc)
                yield inspect.cleandoc(doc)


def stdlib_documents(modules=DEFAULT_MODULES, max_docs: int | None = None) -> list[str]:
    """Return cleaned prose paragraphs (one document each, in a fixed order, without duplicates)."""
    docs, seen = [], set()
    for name in modules:
        for doc in _docstrings(name):
            for par in re.split(r"\n\s*\n", doc):
                text = _clean_paragraph(par)
                if text and text not in seen:
                    seen.add(text)
                    docs.append(text)
                    if max_docs and len(docs) >= max_docs:
                        return docs
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Text file to write, one document per line.")
    parser.add_argument("--max_docs", type=int, default=None, help="Stop after this many documents (default: all).")
    args = parser.parse_args()
    docs = stdlib_documents(max_docs=args.max_docs)
    atomic_write_text(args.out, "\n".join(docs) + "\n")
    logger.info("wrote %d documents, %d words to %s", len(docs), sum(len(d.split()) for d in docs), args.out)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run_cli(main)
