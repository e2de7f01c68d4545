"""Noise-aware comparisons for the quickstart's report.

Two sets of runs are compared pair by pair: runs that share a teacher and a seed (the same data
order, masks and interchange positions) form a pair. A difference counts only when both hold:

- it is significant in a two-sided paired t-test over the pairs (p < ALPHA; scipy.stats.ttest_rel),
- it is larger than the seeds' spread: the larger of the two sets' standard deviations over seeds
  *within a teacher* (pooled over teachers). With several teachers the spread between teachers is
  not noise of the comparison: the pairs share their teacher, so it cancels in the differences,
  and counting it would hide a difference that every pair shows.

Otherwise the verdict is "no clear difference": with one seed nothing can be told, and a
difference within the spread is not claimed even when it is consistent. The 95% interval of the
mean difference is Student's t over the pairs. Against the student at initialisation (one model per
teacher) the same test is a one-sample t-test of the differences.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

ALPHA = 0.05
TEST_NAME = "two-sided paired t-test over seeds"


@dataclass(frozen=True)
class Comparison:
    """`a` against `b` over their common pairs; `diff` = mean(a - b)."""

    n: int
    mean_a: float
    mean_b: float
    diff: float
    lo: float | None  # 95% interval of the mean difference (None with one pair)
    hi: float | None
    p: float | None  # two-sided paired t-test (None with one pair)
    spread: float | None  # the larger within-teacher standard deviation over seeds of the two sets
    wins: int  # pairs where a is better
    lower_is_better: bool

    @property
    def clear(self) -> bool:
        return (self.p is not None and self.p < ALPHA and self.spread is not None
                and abs(self.diff) > self.spread)

    @property
    def result(self) -> str:
        """'better', 'worse' (a against b) or 'no clear difference'."""
        if not self.clear:
            return "no clear difference"
        return "better" if (self.diff < 0) == self.lower_is_better else "worse"

    def interval(self, fmt: str = "{:+.2f}", scale: float = 1.0) -> str:
        """`+1.23 [0.50, 1.96]` (the change and its 95% interval), or the change alone with one pair."""
        text = fmt.format(self.diff * scale)
        if self.lo is None:
            return text + " (one seed: no interval)"
        return text + f" [{fmt.format(self.lo * scale)}, {fmt.format(self.hi * scale)}]"

    def evidence(self) -> str:
        """`p = 0.012, spread 1.3` or why no test was made."""
        if self.p is None:
            return "one seed: no test"
        return f"p = {self.p:.3g}"


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def seed_spread(values: dict) -> float | None:
    """The standard deviation over seeds within a teacher, pooled over teachers, of values keyed by (teacher, seed)
    (or by seed alone: one teacher). None when no teacher has two seeds."""
    groups: dict = {}
    for key, value in values.items():
        groups.setdefault(key[0] if isinstance(key, tuple) else None, []).append(value)
    dof = sum(len(g) - 1 for g in groups.values())
    if dof == 0:
        return None
    squares = sum(statistics.variance(g) * (len(g) - 1) for g in groups.values() if len(g) > 1)
    return math.sqrt(squares / dof)


def t_quantile(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_p(diffs: list[float]) -> float:
    """Two-sided p of the paired t-test on these differences (0 or 1 when they do not vary)."""
    sd = _sd(diffs)
    mean = statistics.fmean(diffs)
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    from scipy.stats import t

    stat = mean / (sd / math.sqrt(len(diffs)))
    return float(2 * t.sf(abs(stat), len(diffs) - 1))


def compare(a: dict, b: dict, lower_is_better: bool) -> Comparison:
    """`a` against `b`, paired by key (a key of `a` missing from `b` is an error)."""
    keys = sorted(a)
    missing = [k for k in keys if k not in b]
    if missing or not keys:
        raise ValueError(f"nothing to pair for keys {missing or keys}")
    xa, xb = [a[k] for k in keys], [b[k] for k in keys]
    diffs = [x - y for x, y in zip(xa, xb)]
    n = len(diffs)
    diff = statistics.fmean(diffs)
    better = (lambda d: d < 0) if lower_is_better else (lambda d: d > 0)
    wins = sum(better(d) for d in diffs)
    if n < 2:
        return Comparison(n, statistics.fmean(xa), statistics.fmean(xb), diff, None, None, None, None, wins,
                          lower_is_better)
    half = t_quantile(n - 1) * _sd(diffs) / math.sqrt(n)
    spreads = [s for s in (seed_spread(a), seed_spread({k: b[k] for k in keys})) if s is not None]
    return Comparison(n, statistics.fmean(xa), statistics.fmean(xb), diff, diff - half, diff + half,
                      paired_p(diffs), max(spreads) if spreads else None, wins, lower_is_better)


def against_reference(a: dict, reference: dict, lower_is_better: bool) -> Comparison:
    """`a` (keyed by (teacher, seed)) against one reference value per teacher (keyed by teacher)."""
    return compare(a, {k: reference[k[0]] for k in a}, lower_is_better)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def plus_minus(values, fmt="{:.2f}") -> str:
    """`mean ± std` of `values` (the mean alone for one value)."""
    mean, std = mean_std(list(values))
    return fmt.format(mean) + (" ± " + fmt.format(std) if std is not None else "")
