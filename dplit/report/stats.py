"""Statistics for the report: Student t quantiles, mean and 95% CI across seeds, Spearman rho, per-group summaries.

Student t quantiles come from ``scipy.stats`` (a dependency of opacus); the sweep's intervals use the same functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from dplit.report.runs import Run, natural_key

CONFIDENCE = 0.95


def t_quantile(p: float, df: float) -> float:
    """Quantile (inverse CDF) of Student's t with ``df`` (also non-integer, Welch) degrees of freedom."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    return float(scipy_stats.t.ppf(p, df))


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` seeds and the half-width of its confidence interval (None with a single seed)."""

    mean: float
    half: float | None
    n: int


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean and Student t confidence-interval half-width ``t_{(1+c)/2, n-1} * s / sqrt(n)`` (s with n-1)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    if x.size < 2:
        return Estimate(float(x.mean()), None, 1)
    sem = float(x.std(ddof=1)) / math.sqrt(x.size)
    half = t_quantile((1 + confidence) / 2, x.size - 1) * sem if sem > 0 else 0.0
    return Estimate(float(x.mean()), half, int(x.size))


def difference_ci(
    a: Sequence[float],
    b: Sequence[float],
    seeds_a: Sequence[int | None] = (),
    seeds_b: Sequence[int | None] = (),
    confidence: float = CONFIDENCE,
) -> Estimate:
    """Mean of ``a`` minus mean of ``b`` with a CI: paired by seed when both sides have the same >= 2 distinct seeds,
    else Welch's interval over the sides with >= 2 values (a side with one value counts as exact)."""
    if len(a) == len(b) >= 2 and None not in seeds_a and len(set(seeds_a)) == len(a) and set(seeds_a) == set(seeds_b):
        by_seed = dict(zip(seeds_b, b, strict=True))
        return mean_ci([x - by_seed[s] for x, s in zip(a, seeds_a, strict=True)], confidence)
    mean = float(np.mean(a) - np.mean(b))
    terms = [float(np.var(v, ddof=1)) / len(v) for v in (a, b) if len(v) >= 2]
    dofs = [len(v) - 1 for v in (a, b) if len(v) >= 2]
    n = max(len(a), len(b))
    if not terms:
        return Estimate(mean, None, n)
    var = sum(terms)
    if var == 0.0:
        return Estimate(mean, 0.0, n)
    df = var**2 / sum(t**2 / d for t, d in zip(terms, dofs, strict=True))  # Welch-Satterthwaite
    return Estimate(mean, t_quantile((1 + confidence) / 2, df) * math.sqrt(var), n)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, ties sharing the average of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation with average ranks for ties; NaN with < 2 points or a constant variable."""
    if len(x) != len(y):
        raise ValueError(f"spearman_rho needs equal lengths, got {len(x)} and {len(y)}")
    if len(x) < 2:
        return math.nan
    rx, ry = np.asarray(average_ranks(x)) - (len(x) + 1) / 2, np.asarray(average_ranks(y)) - (len(x) + 1) / 2
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else math.nan


def interpret_rho(rho: float) -> str:
    """One sentence on what a Spearman rho between non-DP group accuracy and privacy cost means."""
    if math.isnan(rho):
        return "undefined (fewer than two groups, or all groups have the same accuracy or cost)"
    strength = "strong" if abs(rho) >= 0.7 else "moderate" if abs(rho) >= 0.4 else "weak"
    if rho < 0:
        return (
            f"{strength} negative: groups with lower non-DP accuracy lose more accuracy under DP "
            '("the poor get poorer")'
        )
    if rho > 0:
        return f'{strength} positive: groups with higher non-DP accuracy lose more; no "poor get poorer" effect'
    return "zero: no monotone relation between a group's non-DP accuracy and its privacy cost"


@dataclass
class GroupRow:
    """One group of one DP setting: accuracies (fractions) across seeds, and the cost = non-DP - DP."""

    group: str
    count: float | None
    """Examples of the group in the compared split (validation or test)."""
    dp: Estimate
    nondp: Estimate | None
    cost: Estimate | None
    train_count: float | None = None
    """Training examples of the group (from the runs' ``summary.json``; None when unknown)."""
    dp_auc: Estimate | None = None
    """Per-group ROC AUC of the DP runs (None unless every DP run logged ``<split>/auc/group=<g>``)."""
    nondp_auc: Estimate | None = None
    """The same for the non-DP runs."""


@dataclass
class Summary:
    """Per-group comparison of one DP setting (its seeds) with the non-DP baseline (its seeds), if any."""

    label: str
    epsilon: float | None
    rows: list[GroupRow]
    overall: Estimate | None
    worst_dp: Estimate
    worst_nondp: Estimate | None
    auc_gap_dp: Estimate | None = None
    """Max - min per-group AUC of each DP run, over its seeds (None unless every run has two groups' AUCs)."""
    auc_gap_nondp: Estimate | None = None

    @property
    def cost_gap(self) -> float | None:
        """Max - min mean privacy cost over groups."""
        costs = [r.cost.mean for r in self.rows if r.cost is not None]
        return max(costs) - min(costs) if costs else None

    @property
    def rho(self) -> float | None:
        """Spearman rho between the mean non-DP accuracy and the mean privacy cost of the groups."""
        if any(r.nondp is None or r.cost is None for r in self.rows):
            return None
        return spearman_rho([r.nondp.mean for r in self.rows], [r.cost.mean for r in self.rows])  # type: ignore[union-attr]

    def extreme_group(self, key: str, highest: bool) -> str:
        """Name of the group with the highest/lowest mean ``dp``, ``nondp`` or ``cost``."""
        rows = [r for r in self.rows if getattr(r, key) is not None]
        pick = max if highest else min
        return pick(rows, key=lambda r: getattr(r, key).mean).group


def summarize(label: str, epsilon: float | None, dp: list[Run], baseline: list[Run], split: str) -> Summary:
    """Compare one DP setting's runs (seeds) with the baseline runs, group by group, on ``split``."""
    groups = sorted(dp[0].groups(split), key=natural_key)
    dp_seeds, base_seeds = [r.seed for r in dp], [r.seed for r in baseline]
    rows = []
    for g in groups:
        dp_acc = [r.group_acc(split)[g] for r in dp]
        base_acc = [r.group_acc(split)[g] for r in baseline]
        counts = [c for r in dp + baseline if (c := r.group_count(split).get(g)) is not None]
        train = [c for r in dp + baseline if (c := r.train_counts().get(g)) is not None]
        rows.append(
            GroupRow(
                group=g,
                count=float(np.mean(counts)) if counts else None,
                train_count=float(np.mean(train)) if train else None,
                dp=mean_ci(dp_acc),
                nondp=mean_ci(base_acc) if baseline else None,
                cost=difference_ci(base_acc, dp_acc, base_seeds, dp_seeds) if baseline else None,
                dp_auc=_auc_estimate([r.group_auc(split).get(g) for r in dp]),
                nondp_auc=_auc_estimate([r.group_auc(split).get(g) for r in baseline]),
            )
        )
    overall = [a for r in dp if (a := r.overall_acc(split)) is not None]
    return Summary(
        label=label,
        epsilon=epsilon,
        rows=rows,
        overall=mean_ci(overall) if overall else None,
        worst_dp=mean_ci([min(r.group_acc(split).values()) for r in dp]),
        worst_nondp=mean_ci([min(r.group_acc(split).values()) for r in baseline]) if baseline else None,
        auc_gap_dp=_auc_gap(dp, split),
        auc_gap_nondp=_auc_gap(baseline, split),
    )


def _auc_estimate(values: list[float | None]) -> Estimate | None:
    """Mean and CI of one group's AUC over runs, or None when a run lacks it (or there are no runs)."""
    present = [v for v in values if v is not None]
    return mean_ci(present) if present and len(present) == len(values) else None


def _auc_gap(runs: list[Run], split: str) -> Estimate | None:
    """Mean and CI over runs of each run's max - min per-group AUC (None unless every run has >= 2 groups' AUCs)."""
    aucs = [list(r.group_auc(split).values()) for r in runs]
    if not aucs or any(len(a) < 2 for a in aucs):
        return None
    return mean_ci([max(a) - min(a) for a in aucs])


def seeds_note(summaries: list[Summary]) -> str:
    """What the error bars are: ``n=1 seed, no intervals``, or ``n=3 seeds, 95% CI`` (range when settings differ)."""
    ns = sorted({e.n for s in summaries for r in s.rows for e in (r.dp, r.nondp) if e is not None})
    if not ns or ns[-1] <= 1:
        return "n=1 seed, no intervals"
    seeds = f"{ns[0]}-{ns[-1]}" if len(ns) > 1 else str(ns[0])
    return f"n={seeds} seeds, bars: 95% CI"


def size_basis(summaries: list[Summary]) -> tuple[list[list[float | None]], str]:
    """Point sizes for the scatter: training examples per group when every row knows them, else the evaluation
    counts (said in the legend title, so a plot never passes one off as the other)."""
    rows = [r for s in summaries for r in s.rows]
    if rows and all(r.train_count is not None for r in rows):
        return [[r.train_count for r in s.rows] for s in summaries], "point size: training examples of the group"
    return (
        [[r.count for r in s.rows] for s in summaries],
        "point size: evaluation examples (training counts unknown: runs without summary.json)",
    )
