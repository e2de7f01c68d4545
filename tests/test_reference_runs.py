"""docs/runs/: the documented study runs, shipped so that another machine can compare its run with them
(`scripts/compare_runs.py docs/runs/<name> <folder>`). The tables docs/quickstart.md prints must be theirs."""
import json
import re

import pytest

from pipelines.quickstart.environment import PINNED_KERNELS, documented_versions, version_warnings
from utils import REPO_ROOT

RUNS = REPO_ROOT / "docs" / "runs"
REFERENCES = sorted(p for p in RUNS.iterdir() if p.is_dir()) if RUNS.is_dir() else []
TOKEN = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?|\w+")  # a number or a word: "better" is a figure too


def table_rows(text: str) -> list[list[str]]:
    """Each table row of a Markdown text as its cells (separator rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def in_order(wanted: list[str], found: list[str]) -> bool:
    """Whether `wanted` is a subsequence of `found` (the docs may leave columns out, never change one)."""
    rest = iter(found)
    return all(any(w == f for f in rest) for w in wanted)


def docs_sections(name: str) -> str:
    """The sections of docs/quickstart.md (between headings) that name `docs/runs/<name>`: the run's tables."""
    text = (REPO_ROOT / "docs" / "quickstart.md").read_text(encoding="utf-8")
    naming = [s for s in re.split(r"\n(?=#{2,4} )", text) if f"docs/runs/{name}" in s]
    assert naming, f"docs/quickstart.md names docs/runs/{name} nowhere"
    return "\n".join(naming)


def test_there_are_references():
    assert {p.name for p in REFERENCES} >= {"llama_study", "bert_study_zen2"}


@pytest.mark.parametrize("ref", REFERENCES, ids=lambda p: p.name)
def test_every_docs_table_row_is_the_shipped_report(ref):
    report = table_rows((ref / "report.md").read_text(encoding="utf-8"))
    rows = table_rows(docs_sections(ref.name))
    assert len(rows) >= 10, "the section should hold the run's tables"
    for row in rows:
        same_label = [r for r in report if r[0] == row[0]]
        assert same_label, f"docs row {row[0]!r} is in no table of {ref.name}/report.md"
        wanted = TOKEN.findall(" | ".join(row[1:]))
        assert any(in_order(wanted, TOKEN.findall(" | ".join(r[1:]))) for r in same_label), (
            f"docs/quickstart.md's row {' | '.join(row)!r} is not what {ref.name}/report.md says")


@pytest.mark.parametrize("ref", REFERENCES, ids=lambda p: p.name)
def test_the_shipped_report_is_the_shipped_summary(ref):
    summary = json.loads((ref / "summary.json").read_text(encoding="utf-8"))
    report = (ref / "report.md").read_text(encoding="utf-8")
    arms = {k: v for k, v in summary.items()
            if isinstance(v, dict) and isinstance(v.get("mean"), float) and isinstance(v.get("std"), float)}
    assert len(arms) >= 10
    for name, arm in arms.items():
        assert f"{arm['mean']:.2f} ± {arm['std']:.2f}" in report, name
    digests = json.loads((ref / "weights.sha256.json").read_text(encoding="utf-8"))
    assert len(digests) > 200 and all(re.fullmatch(r"[0-9a-f]{64}", d) for d in digests.values())


@pytest.mark.parametrize("ref", REFERENCES, ids=lambda p: p.name)
def test_the_reference_was_measured_with_the_pinned_versions(ref):
    """A reference from other versions than constraints.txt's would not be what the README's set-up reproduces."""
    env = json.loads((ref / "summary.json").read_text(encoding="utf-8"))["environment"]
    documented = documented_versions()
    packages = {name: version.split("+")[0] for name, version in env["packages"].items()}
    assert packages.keys() <= documented.keys()
    assert not version_warnings(packages, documented)
    assert env["pinned"] == PINNED_KERNELS
