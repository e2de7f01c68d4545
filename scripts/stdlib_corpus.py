"""Assemble a corpus of real English prose from documentation every Python installation has.

By default, the Python standard library's docstrings; with --pydoc_topics, also the prose of the
interpreter's topic help; with --packages, also the documentation of installed packages (the
docstrings of their .py files, read without importing them, their .md/.rst/.txt prose and their
README). Code examples, reST/markdown markup and short fragments are dropped; each remaining
paragraph is one line, each paragraph appears once (doc_corpus.py does the work).

So tests and the offline quickstart need no download and the repository ships no data. The same
Python and package versions give the same bytes. --manifest records those versions and which
document (module, topic or package file) each line comes from, so a corpus can be split by
document rather than by line.

Usage: python scripts/stdlib_corpus.py --out corpus.txt [--max_docs N]
       python scripts/stdlib_corpus.py --out corpus.txt --pydoc_topics --packages torch transformers numpy \\
           scipy scikit-learn datasets --manifest corpus.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging

from doc_corpus import build_corpus, versions
from atomic_files import atomic_write_text
from utils import check_output_parent, CliError, logger, run_cli


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Text file to write, one paragraph per line.")
    parser.add_argument("--max_docs", type=int, default=None,
                        help="Stop after this many paragraphs (default: all).")
    parser.add_argument("--pydoc_topics", action="store_true",
                        help="Add the prose of the interpreter's topic help (pydoc_data.topics), after the docstrings.")
    parser.add_argument("--packages", nargs="*", default=[], metavar="DIST",
                        help="Add the documentation of these installed distributions (pip names, e.g. scikit-learn), "
                             "in this order. One that is not installed is an error.")
    parser.add_argument("--manifest", default=None,
                        help="Also write this JSON file: the Python and package versions, the documents (name, "
                             "number of lines, in order) and the corpus's SHA-256.")
    args = parser.parse_args(argv)
    if args.max_docs is not None and args.max_docs < 1:
        raise CliError(f"--max_docs must be at least 1, got {args.max_docs}")
    record = versions(args.packages)
    missing = [name for name, version in record["packages"].items() if version is None]
    if missing:
        raise CliError(f"--packages: not installed here: {', '.join(missing)}")
    check_output_parent(args.out, "--out")
    if args.manifest:
        check_output_parent(args.manifest, "--manifest")
    lines, documents = build_corpus(args.packages, args.pydoc_topics, max_docs=args.max_docs)
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    record.update({"pydoc_topics": args.pydoc_topics, "max_docs": args.max_docs, "lines": len(lines),
                   "words": sum(len(line.split()) for line in lines),
                   "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                   "documents": [list(d) for d in documents]})
    if args.manifest:
        atomic_write_text(args.manifest, json.dumps(record, indent=1) + "\n")
    logger.info("wrote %d paragraphs of %d documents, %d words to %s", len(lines), len(documents), record["words"],
                args.out)
    return record


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    run_cli(main)
