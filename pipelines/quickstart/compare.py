"""Two quickstart folders side by side: which figures moved, by how much, and whether a verdict changed.

Used to measure how far the numbers move from one machine (CPU kind, packages, kernel pin) to another
(`scripts/compare_runs.py`, docs/quickstart.md). Reads what a run left: `summary.json` (every figure at full
precision, each comparison's verdict as the report decided it) and the files each stage builds on: the trained
tokenizer (`tokenizer/tokenizer.json`) and the weight files (`*.safetensors`).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from atomic_files import file_digest

# keys whose values are clocks or machine facts, not results
_NOT_A_FIGURE = re.compile(r"seconds|time|load|wall|started|finished|^environment/|^corpus/versions/")
_NUMBER = re.compile(r"[-+]?\d+(?:,\d{3})*(?:\.\d+)?(?:e[-+]?\d+)?")  # 1,234.5e-3; not the comma after "Holm 1,"
_RUN = re.compile(r"(teacher \d+ ?)?(seed \d+)?$")  # a run's key under a figure: "seed 2", "teacher 3 seed 1"


def figures(summary: dict) -> dict[str, float]:
    """Every numeric leaf of a summary.json that is a result, by its slash-joined path."""
    found: dict[str, float] = {}

    def walk(value, path: str) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}/{key}" if path else str(key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}/{index}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not _NOT_A_FIGURE.search(path):
            found[path] = float(value)

    walk(summary, "")
    return found


def kind_of(path: str) -> str:
    """The figure's kind, for grouping: the last named part of its path (`seed 1` and indices dropped)."""
    parts = [p for p in path.split("/") if not p.isdigit() and not _RUN.match(p)]
    return parts[-1] if parts else path


def relative_difference(a: float, b: float) -> float:
    """|a - b| over the larger magnitude; 0 for equal values, inf when only one is not finite."""
    if a == b or (math.isnan(a) and math.isnan(b)):
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))


def verdict_shape(verdict: str) -> list[str]:
    """The verdict's lines with every number taken out: what a reader concludes, not the digits."""
    return [" ".join(_NUMBER.sub("#", line).split()) for line in verdict.splitlines() if line.strip()]


def verdicts(summary: dict) -> dict[str, str]:
    """Each comparison's verdict as the report decided it (`better`, `worse`, `no clear difference`)."""
    return {name: c["result"] for name, c in (summary.get("comparisons") or {}).items()
            if isinstance(c, dict) and "result" in c}


def weight_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of the trained tokenizer and of every `*.safetensors` file under a run folder, by path relative to
    the folder: the first of them that differs between two runs is the stage where they parted."""
    files = sorted(folder.rglob("*.safetensors"))
    tokenizer = folder / "tokenizer" / "tokenizer.json"
    if tokenizer.is_file():
        files.insert(0, tokenizer)
    return {path.relative_to(folder).as_posix(): file_digest(path) for path in files}


# what a run was asked to do: two runs that differ here are two experiments, not one on two machines
_SETUP = ("family", "preset", "seeds", "teachers")

# the order in which the quickstart's stages write their files: the tokenizer, the teachers, the students they
# initialise, then every trained student
_STAGE_ORDER = ("tokenizer/", "teacher", "student_init", "random_student")


def pipeline_order(path: str) -> tuple[int, str]:
    return next((i for i, prefix in enumerate(_STAGE_ORDER) if path.startswith(prefix)), len(_STAGE_ORDER)), path


@dataclass
class RunComparison:
    """What two runs share: figures (equal, moved, by kind), verdict lines, comparisons' verdicts, weight files."""

    common: int = 0
    equal: int = 0
    only_in_one: int = 0
    largest: dict[str, tuple[float, str]] = field(default_factory=dict)  # kind -> (relative difference, path)
    moved: dict[str, int] = field(default_factory=dict)  # kind -> how many figures of that kind moved
    verdict_changes: list[tuple[str, str]] = field(default_factory=list)
    flipped: list[str] = field(default_factory=list)  # comparisons whose verdict differs between the runs
    weights_common: int = 0
    weights_equal: int = 0
    weights_differing: list[str] = field(default_factory=list)  # in pipeline order: the earliest stage first
    setup_differs: list[str] = field(default_factory=list)  # "family: bert / llama": not the same experiment

    def lines(self) -> list[str]:
        """A short markdown account."""
        out = [f"- **not the same experiment** ({', '.join(self.setup_differs)}): what differs is not the machine's doing"
               ] if self.setup_differs else []
        out += [f"- figures in both runs: {self.common} ({self.only_in_one} in one only); bit for bit equal: {self.equal}"]
        for kind in sorted(self.largest, key=lambda k: -self.largest[k][0]):
            rel, path = self.largest[kind]
            out.append(f"  - `{kind}`: {self.moved[kind]} moved, largest relative difference {rel:.3g} (`{path}`)")
        out.append(f"- weight files in both: {self.weights_common}; byte for byte equal: {self.weights_equal}")
        if self.weights_differing:
            shown = ", ".join(f"`{p}`" for p in self.weights_differing[:4])
            more = len(self.weights_differing) - 4
            out.append(f"  - differing, earliest stage first: {shown}" + (f" and {more} more" if more > 0 else ""))
        out.append("- comparisons whose verdict (better, worse, no clear difference) differs: "
                   + (", ".join(f"`{name}`" for name in self.flipped) or "none"))
        if self.verdict_changes:
            out.append("- verdict lines that read differently (numbers aside):")
            out += [f"  - `{a}`\n    `{b}`" for a, b in self.verdict_changes]
        else:
            out.append("- verdict lines, numbers aside: the same")
        return out


def compare(summary_a: dict, summary_b: dict, weights_a: dict[str, str] | None = None,
            weights_b: dict[str, str] | None = None) -> RunComparison:
    """Compare two runs' summaries (and optionally their weight digests)."""
    result = RunComparison()
    result.setup_differs = [f"{key}: {summary_a.get(key)} / {summary_b.get(key)}" for key in _SETUP
                            if summary_a.get(key) != summary_b.get(key)]
    fa, fb = figures(summary_a), figures(summary_b)
    common = fa.keys() & fb.keys()
    result.common, result.only_in_one = len(common), len(fa.keys() ^ fb.keys())
    for path in sorted(common):
        rel = relative_difference(fa[path], fb[path])
        if rel == 0.0:
            result.equal += 1
            continue
        kind = kind_of(path)
        result.moved[kind] = result.moved.get(kind, 0) + 1
        if rel > result.largest.get(kind, (-1.0, ""))[0]:
            result.largest[kind] = (rel, path)
    va, vb = verdict_shape(summary_a.get("verdict", "")), verdict_shape(summary_b.get("verdict", ""))
    result.verdict_changes = [(a, b) for a, b in zip(va, vb) if a != b]
    if len(va) != len(vb):
        result.verdict_changes.append((f"{len(va)} lines", f"{len(vb)} lines"))
    sa, sb = verdicts(summary_a), verdicts(summary_b)
    result.flipped = sorted(name for name in sa.keys() & sb.keys() if sa[name] != sb[name])
    if weights_a is not None and weights_b is not None:
        shared = weights_a.keys() & weights_b.keys()
        result.weights_common = len(shared)
        result.weights_equal = sum(weights_a[k] == weights_b[k] for k in shared)
        result.weights_differing = sorted((k for k in shared if weights_a[k] != weights_b[k]), key=pipeline_order)
    return result


def load_run(folder: Path) -> tuple[dict, dict[str, str]]:
    """A run folder's summary.json and weight digests; a digests file (`weights.sha256.json`) stands in for
    the weights when the folder came back from another machine without them."""
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    listed = folder / "weights.sha256.json"
    digests = json.loads(listed.read_text(encoding="utf-8")) if listed.is_file() else weight_digests(folder)
    return summary, digests
