"""Noise-aware comparisons for the quickstart's report.

Two sets of runs are compared pair by pair: runs that share a teacher and a seed (the same data
order, masks and interchange positions) form a pair. The unit of the test is the teacher when there
are several: a claim about the method at this scale is a claim over teachers, and the seeds of one
teacher share it, so they are not independent evidence. Then the test is a one-sample t-test of the
per-teacher means of the paired differences (n = teachers). With one teacher the paired t-test over
its seeds is made and shown, but it decides nothing (`NO_VERDICT`): it measures that teacher only,
and another teacher (another seed, or the same seed computed on another CPU kind, docs/quickstart.md)
can say otherwise. The test over every pair (the per-seed view) is kept as a secondary figure.

A difference counts only when all of these hold:

- it is significant after Holm's correction over the report's comparisons (`holm`; adjusted p < ALPHA),
- it is larger than the seeds' spread: the larger of the two sets' standard deviations over seeds
  *within a teacher* (pooled over teachers). The spread between teachers is not noise of the
  comparison: the pairs share their teacher, so it cancels in the differences.

Otherwise the verdict is "no clear difference": with one seed nothing can be told, and a difference
within the spread is not claimed even when it is consistent. A comparison that only describes (the
ablation's, `claim=False`) reads its one teacher's seeds as its units and keeps their outcome. The 95%
interval of the mean difference is Student's t over the units. Against the student at
initialisation (one model per teacher) the same test is made on the differences from it.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace

ALPHA = 0.05
NO_VERDICT = "no verdict (one teacher)"
TEST_NAME = "two-sided t-test over teachers (per-teacher means of paired differences; over seeds with one teacher)"


@dataclass(frozen=True)
class Comparison:
    """`a` against `b` over their common pairs; `diff` = mean(a - b) over the units (teachers, or seeds)."""

    n: int  # units: teachers (several teachers) or seeds (one teacher)
    mean_a: float
    mean_b: float
    diff: float
    lo: float | None  # 95% interval of the mean difference (None with one unit)
    hi: float | None
    p: float | None  # two-sided t-test over the units (None with one unit)
    spread: float | None  # the larger within-teacher standard deviation over seeds of the two sets
    wins: int  # pairs where a is better
    lower_is_better: bool
    unit: str = "seed"  # "teacher" or "seed"
    pairs: int = 0  # (teacher, seed) pairs
    p_seed: float | None = None  # the paired t-test over every pair (the per-seed view; secondary)
    p_holm: float | None = None  # p after Holm's correction over the report's comparisons (`holm`)
    claim: bool = True  # a claim about the method: decided over teachers only (one teacher: NO_VERDICT)

    @property
    def p_used(self) -> float | None:
        return self.p_holm if self.p_holm is not None else self.p

    @property
    def clear(self) -> bool:
        return (self.p_used is not None and self.p_used < ALPHA and self.spread is not None
                and abs(self.diff) > self.spread)

    @property
    def outcome(self) -> str:
        """What the test over the units says: 'better', 'worse' (a against b) or 'no clear difference'."""
        if not self.clear:
            return "no clear difference"
        return "better" if (self.diff < 0) == self.lower_is_better else "worse"

    @property
    def result(self) -> str:
        """The verdict: the outcome, or NO_VERDICT for a claim tested over one teacher's seeds."""
        return NO_VERDICT if self.claim and self.unit == "seed" else self.outcome

    def interval(self, fmt: str = "{:+.2f}", scale: float = 1.0) -> str:
        """`+1.23 [0.50, 1.96]` (the change and its 95% interval), or the change alone with one unit."""
        text = fmt.format(self.diff * scale)
        if self.lo is None:
            return text + f" (one {self.unit}: no interval)"
        return text + f" [{fmt.format(self.lo * scale)}, {fmt.format(self.hi * scale)}]"

    def evidence(self) -> str:
        """`p = 0.012, Holm 0.048, 5 teachers` or why no test was made."""
        if self.p is None:
            return f"one {self.unit}: no test"
        text = f"p = {self.p:.3g}"
        if self.p_holm is not None:
            text += f", Holm {self.p_holm:.3g}"
        return text + f", {self.n} {self.unit}s"

    def per_seed(self) -> str:
        """The secondary view: the paired t-test over every (teacher, seed) pair."""
        return "-" if self.p_seed is None else f"p = {self.p_seed:.3g} over {self.pairs} pairs"


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


def _unit_values(diffs: dict) -> tuple[str, list[float]]:
    """("teacher", per-teacher means) when the keys (teacher, seed) name several teachers, else ("seed", diffs)."""
    groups: dict = {}
    for key, d in diffs.items():
        groups.setdefault(key[0] if isinstance(key, tuple) else None, []).append(d)
    if len(groups) > 1:
        return "teacher", [statistics.fmean(g) for g in groups.values()]
    return "seed", list(diffs.values())


def compare(a: dict, b: dict, lower_is_better: bool, claim: bool = True) -> Comparison:
    """`a` against `b`, paired by key (a key of `a` missing from `b` is an error); `claim=False` for a comparison
    that describes one teacher's runs rather than claims something of the method."""
    keys = sorted(a)
    missing = [k for k in keys if k not in b]
    if missing or not keys:
        raise ValueError(f"nothing to pair for keys {missing or keys}")
    diffs = {k: a[k] - b[k] for k in keys}
    unit, units = _unit_values(diffs)
    n = len(units)
    better = (lambda d: d < 0) if lower_is_better else (lambda d: d > 0)
    wins = sum(better(d) for d in diffs.values())
    mean_a, mean_b = statistics.fmean(a[k] for k in keys), statistics.fmean(b[k] for k in keys)
    p_seed = paired_p(list(diffs.values())) if len(diffs) > 1 else None
    diff = statistics.fmean(units)
    if n < 2:
        return Comparison(n, mean_a, mean_b, diff, None, None, None, None, wins, lower_is_better, unit, len(diffs),
                          p_seed if unit == "teacher" else None, claim=claim)
    half = t_quantile(n - 1) * _sd(units) / math.sqrt(n)
    spreads = [s for s in (seed_spread(a), seed_spread({k: b[k] for k in keys})) if s is not None]
    return Comparison(n, mean_a, mean_b, diff, diff - half, diff + half, paired_p(units),
                      max(spreads) if spreads else None, wins, lower_is_better, unit, len(diffs), p_seed, claim=claim)


def holm(comparisons: dict) -> dict:
    """The comparisons (by name) with `p_holm`: Holm's step-down adjustment over those that have a p."""
    tested = sorted((c.p, name) for name, c in comparisons.items() if c.p is not None)
    m, running, out = len(tested), 0.0, dict(comparisons)
    for i, (p, name) in enumerate(tested):
        running = max(running, min(1.0, (m - i) * p))
        out[name] = replace(comparisons[name], p_holm=running)
    return out


def against_reference(a: dict, reference: dict, lower_is_better: bool, claim: bool = True) -> Comparison:
    """`a` (keyed by (teacher, seed)) against one reference value per teacher (keyed by teacher)."""
    return compare(a, {k: reference[k[0]] for k in a}, lower_is_better, claim)


def one_standard_error(scores: list[list[float]]) -> tuple[int, int]:
    """The one-standard-error rule (Hastie, Tibshirani and Friedman, *The Elements of Statistical Learning*, 7.10).
    `scores`: each candidate's scores over seeds (lower is better), from the most preferred candidate to the least.
    Returns (the first candidate whose mean is at most the lowest mean plus that best candidate's standard error,
    the candidate with the lowest mean). The standard error is the best candidate's standard deviation over its
    seeds over the square root of their number; with one seed there is none, and the lowest mean is chosen."""
    means = [statistics.fmean(s) for s in scores]
    best = means.index(min(means))
    n = len(scores[best])
    bound = means[best] + (statistics.stdev(scores[best]) / math.sqrt(n) if n > 1 else 0.0)
    return next(i for i, m in enumerate(means) if m <= bound), best


def mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def plus_minus(values, fmt="{:.2f}") -> str:
    """`mean ± std` of `values` (the mean alone for one value)."""
    mean, std = mean_std(list(values))
    return fmt.format(mean) + (" ± " + fmt.format(std) if std is not None else "")
