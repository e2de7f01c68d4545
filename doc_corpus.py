"""Offline English prose for the quickstart and the tests: documentation that ships with Python and its packages.

Three sources, each split into documents and each document into paragraphs (one paragraph, one line):

- the standard library's docstrings (`stdlib_grouped`: one document per module of `DEFAULT_MODULES`,
  its submodules included; imported, as `inspect` sees them);
- the prose of the interpreter's topic help (`pydoc_topic_grouped`: one document per topic);
- installed packages' documentation (`package_grouped`: one document per file of the package's
  installed files: the docstrings of every `.py` file, read with `ast` without importing anything,
  the prose of its `.md`/`.rst`/`.txt` files, and the long description of its METADATA).

Nothing is downloaded and nothing depends on hashing or the file system's order: files are read in
sorted order, paragraphs cleaned of code, markup and fragments, and a paragraph seen before is
dropped. So the same Python and package versions give the same documents, byte for byte
(`tests/test_doc_corpus.py`); `versions` names them. `scripts/stdlib_corpus.py` is the command line.

Other versions give other documents, so the quickstart does not build its corpus from what is
installed: it reads the copy shipped in `data/` (`shipped_corpus`), built once by
`scripts/stdlib_corpus.py` with the versions its manifest names and checked against its SHA-256.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import json
import lzma
import importlib.metadata as metadata
import inspect
import pkgutil
import platform
import re
import warnings
from pathlib import Path
from typing import Iterator

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
# The packages whose documentation the quickstart's corpus adds (distribution names): the shipped copy was built
# with them (its manifest names the versions).
QUICKSTART_PACKAGES = ("torch", "transformers", "numpy", "scipy", "scikit-learn", "datasets")
SHIPPED = Path(__file__).resolve().parent / "data" / "quickstart_corpus.txt.xz"

Grouped = Iterator[tuple[str, str]]  # (document, paragraph)

# --- paragraphs --------------------------------------------------------------------------------
_MARKDOWN_LINK = (re.compile(r"!?\[([^\]]*)\]\([^)]*\)"), r"\1")  # [text](url) -> text (links, images)
_MARKUP = [
    (re.compile(r":[a-z]+:`~?([^`<]*?)(?:\s*<[^>]*>)?`"), r"\1"),  # :func:`name` -> name
    (re.compile(r"``([^`]*)``"), r"\1"),
    (re.compile(r"`([^`]*)`"), r"\1"),
    (re.compile(r"\*\*?([^*]+)\*\*?"), r"\1"),
    (re.compile(r"\s+"), " "),
]
_CODEY = re.compile(r"(>>>|\.\.\.\s|==|!=|->|\w\(\)|[{}\[\]<>=_#@$\\|])")


def clean_paragraph(par: str, markdown: bool = False) -> str | None:
    """One docstring or prose paragraph as a line of prose, or None for code, tables, markup and fragments.
    `markdown`: keep the text of markdown links (`[text](url)`) instead of rejecting the paragraph."""
    lines = par.splitlines()
    if any(line.startswith((" ", "\t")) for line in lines[1:]) and len(lines) > 1:
        return None  # an indented block: code or a table
    text = " ".join(line.strip() for line in lines)
    for pattern, repl in ([_MARKDOWN_LINK] if markdown else []) + _MARKUP:
        text = pattern.sub(repl, text)
    text = text.strip()
    words = text.split()
    if len(words) < 8 or len(_CODEY.findall(text)) > 0 or not text[0].isupper() or text[-1] not in ".?!":
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return text if letters / len(text) > 0.9 else None


def paragraphs(text: str) -> list[str]:
    return re.split(r"\n\s*\n", text)


# --- the standard library ----------------------------------------------------------------------
def _module_docstrings(module_name: str) -> Iterator[str]:
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


def stdlib_grouped(modules=DEFAULT_MODULES) -> Grouped:
    """(`stdlib:<module>`, paragraph) for the docstrings of each module, in order (not yet deduplicated)."""
    for name in modules:
        for doc in _module_docstrings(name):
            for par in paragraphs(doc):
                text = clean_paragraph(par)
                if text:
                    yield f"stdlib:{name}", text


# --- pydoc's topic help ------------------------------------------------------------------------
_BULLET = re.compile(r"^(?:[*\-+]|\d+\.|\(\d+\)|[a-z][.)])\s+")
_UNDERLINE = re.compile(r"^\s*([*=\-~^\"#+])\1{2,}\s*$")
_NOT_PROSE = re.compile(r">>>|::=|[{}\\|]|-\[")


def clean_topic_paragraph(paragraph: str) -> str | None:
    """One paragraph of `pydoc_data.topics` as a line of prose, or None for code, grammar, tables, headings.

    Prose there is plain text wrapped at 70 columns, sometimes indented as a whole (a method's
    description) or opened by a list bullet; code and grammar blocks have ragged indentation or
    markers such as `>>>` and `::=`.
    """
    lines = [line.rstrip() for line in paragraph.splitlines() if line.strip()]
    if not lines or any(_UNDERLINE.match(line) for line in lines):
        return None
    indents = [len(line) - len(line.lstrip()) for line in lines]
    bullet = _BULLET.match(lines[0].lstrip())
    body_indent = indents[0] + (bullet.end() if bullet else 0)
    if any(indent != body_indent for indent in indents[1:]):
        return None
    text = " ".join(line.strip() for line in lines)
    if bullet:
        text = text[bullet.end():]
    text = re.sub(r"\*\*?([^*]+)\*\*?", r"\1", text)  # *emphasis*
    text = re.sub(r"\s*\[\d+\]", "", text)  # footnote references
    text = re.sub(r"\s+", " ", text).strip()
    if not text or _NOT_PROSE.search(text):
        return None
    if len(text.split()) < 8 or not text[0].isupper() or text[-1] not in ".?!:":
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return text if letters / len(text) > 0.85 else None


def pydoc_topic_grouped() -> Grouped:
    """(`pydoc_topics:<topic>`, paragraph) of the interpreter's topic help, in topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # a trimmed Python without pydoc_data: the docstrings alone will do
        return
    for name in sorted(topics):
        for par in paragraphs(topics[name]):
            text = clean_topic_paragraph(par)
            if text:
                yield f"pydoc_topics:{name}", text


def pydoc_topic_documents() -> list[str]:
    """The prose paragraphs of the interpreter's topic help (`pydoc_data.topics`), in topic order."""
    return [text for _, text in pydoc_topic_grouped()]


# --- installed packages ------------------------------------------------------------------------
_PROSE_SUFFIXES = (".md", ".rst", ".txt")
_NOT_DOCS = re.compile(r"(^|/)(tests?|testing)(/|$)|LICEN[CS]E|COPYING|NOTICE|AUTHORS|"
                       r"(entry_points|top_level|RECORD|requirements|dependency_links)\b", re.IGNORECASE)


def _py_docstrings(source: bytes) -> Iterator[str]:
    """The docstrings of a module's source, module first then in `ast.walk` order; nothing is imported."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _long_description(dist) -> str:
    """The package's long description (its README, in METADATA's body), or ''."""
    text = dist.read_text("METADATA") or ""
    head, _, body = text.replace("\r\n", "\n").partition("\n\n")
    return body


def package_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_grouped(name: str) -> Grouped:
    """(`<package>:<file>`, paragraph) of an installed distribution's documentation, files in sorted order."""
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return
    for par in paragraphs(_long_description(dist)):
        text = clean_paragraph(par, markdown=True)
        if text:
            yield f"{name}:METADATA", text
    for rel in sorted(str(f) for f in dist.files or []):
        if _NOT_DOCS.search(rel) or ".dist-info/" in rel:
            continue
        if rel.endswith(".py"):
            try:
                source = dist.locate_file(rel).read_bytes()
            except OSError:
                continue
            texts = (text for doc in _py_docstrings(source) for text in map(clean_paragraph, paragraphs(doc)))
        elif rel.endswith(_PROSE_SUFFIXES):
            try:
                prose = dist.locate_file(rel).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            texts = (clean_paragraph(par, markdown=rel.endswith(".md")) for par in paragraphs(prose))
        else:
            continue
        for text in texts:
            if text:
                yield f"{name}:{rel}", text


# --- the corpus --------------------------------------------------------------------------------
def versions(packages=()) -> dict:
    """What a corpus of `packages` is made from: the Python version and each package's (None: not installed)."""
    return {"python": platform.python_version(), "packages": {name: package_version(name) for name in packages}}


def build_corpus(packages=(), pydoc_topics: bool = False, modules=DEFAULT_MODULES,
                 max_docs: int | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """(paragraphs, documents): every paragraph once, in source order, and the documents they belong to as
    (name, number of paragraphs) in the same order. Stops after `max_docs` paragraphs."""
    sources = [stdlib_grouped(modules)]
    if pydoc_topics:
        sources.append(pydoc_topic_grouped())
    sources += [package_grouped(name) for name in packages]
    lines: list[str] = []
    documents: list[tuple[str, int]] = []
    seen: set[str] = set()
    for source in sources:
        for document, text in source:
            if text in seen:
                continue
            seen.add(text)
            lines.append(text)
            if documents and documents[-1][0] == document:
                documents[-1] = (document, documents[-1][1] + 1)
            else:
                documents.append((document, 1))
            if max_docs and len(lines) >= max_docs:
                return lines, documents
    return lines, documents


def stdlib_documents(modules=DEFAULT_MODULES, max_docs: int | None = None) -> list[str]:
    """Cleaned prose paragraphs of the standard library's docstrings (one document each, in a fixed order,
    without duplicates)."""
    return build_corpus(modules=modules, max_docs=max_docs)[0]


class CorpusError(Exception):
    """The shipped corpus is missing or is not the one its manifest describes."""


def shipped_corpus(max_paragraphs: int | None = None, path: Path = SHIPPED) -> tuple[list[str], list[tuple[str, int]], dict]:
    """(paragraphs, documents, manifest) of the corpus shipped in `path` (xz text, its manifest beside it as
    `<stem>.json`), its SHA-256 checked; with `max_paragraphs`, the first ones only (as `build_corpus`'s `max_docs`)."""
    manifest_path = path.with_name(path.name.split(".")[0] + ".json")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        raw = lzma.decompress(path.read_bytes())
    except (OSError, ValueError, lzma.LZMAError) as err:
        raise CorpusError(f"the shipped corpus {path} (manifest {manifest_path}) cannot be read: {err}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != manifest.get("sha256"):
        raise CorpusError(f"the shipped corpus {path} has SHA-256 {digest}, its manifest {manifest_path} says "
                          f"{manifest.get('sha256')}: the file is damaged or was changed; restore it from git")
    lines = raw.decode("utf-8").splitlines()
    documents = [tuple(d) for d in manifest["documents"]]
    if max_paragraphs is not None and max_paragraphs < len(lines):
        lines, kept, n = lines[:max_paragraphs], [], 0
        for name, count in documents:
            if n >= max_paragraphs:
                break
            kept.append((name, min(count, max_paragraphs - n)))
            n += kept[-1][1]
        documents = kept
    return lines, documents, manifest
