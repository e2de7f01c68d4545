#!/usr/bin/env python
"""Compare two quickstart runs: which figures moved, by how much, and whether any verdict changed.

Reads each folder's summary.json (every figure at full precision) and the SHA-256 of its weight files
(`*.safetensors`) and trained tokenizer, or the `weights.sha256.json` a folder brought back from another
machine carries:

    python scripts/compare_runs.py ./run_on_amd ./run_on_intel

prints how many figures are bit for bit equal, the largest relative difference of each kind of figure
(perplexity, effective_iia, p, ...), how many weight files are byte for byte equal (the differing ones
earliest stage first: where the runs parted), the comparisons
whose verdict, as the report decided it (better, worse, no clear difference), differs between the runs,
and the verdict lines that read differently once their numbers are taken out. Clocks (seconds, load) are not compared.
--write_digests FOLDER writes FOLDER/weights.sha256.json, so that the folder's figures and digests can
travel without its weights. Exit status 0 either way: differences are a finding, not an error.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from atomic_files import atomic_write_text
from pipelines.quickstart.compare import compare, load_run, weight_digests
from utils import CliError, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="*", type=Path, metavar="FOLDER", help="Two quickstart output folders to compare.")
    parser.add_argument("--write_digests", type=Path, metavar="FOLDER",
                        help="Write FOLDER/weights.sha256.json (the SHA-256 of each weight file) and stop.")
    return parser


def main(argv: list[str] | None = None) -> str:
    """Print the comparison for the command line `argv` and return it."""
    args = build_parser().parse_args(argv)
    if args.write_digests is not None:
        if not args.write_digests.is_dir():
            raise CliError(f"--write_digests: {args.write_digests} is not a folder")
        digests = weight_digests(args.write_digests)
        atomic_write_text(args.write_digests / "weights.sha256.json", json.dumps(digests, indent=1) + "\n")
        text = f"{len(digests)} weight files digested into {args.write_digests / 'weights.sha256.json'}"
        print(text)
        return text
    if len(args.runs) != 2:
        raise CliError(f"give two run folders to compare (got {len(args.runs)})")
    loaded = []
    for folder in args.runs:
        if not (folder / "summary.json").is_file():
            raise CliError(f"{folder} has no summary.json: not a finished quickstart folder")
        try:
            loaded.append(load_run(folder))
        except (OSError, ValueError) as err:
            raise CliError(f"{folder}: cannot read its summary or digests ({err})") from None
    (summary_a, digests_a), (summary_b, digests_b) = loaded
    result = compare(summary_a, summary_b, digests_a, digests_b)
    text = "\n".join([f"{args.runs[0]} against {args.runs[1]}:"] + result.lines())
    print(text)
    return text


if __name__ == "__main__":
    run_cli(main)
