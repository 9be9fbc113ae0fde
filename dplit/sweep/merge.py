"""Merging a sweep report over some seeds with a report over other seeds, when the first one's runs are gone.

A ``sweep_report.json`` keeps, per setting and per metric, the mean and the Student t half-width over its ``n``
seeds. From ``n`` and the half-width the sample standard deviation is recovered exactly
(``s = half * sqrt(n) / t_{(1+c)/2, n-1}``), and two summaries of disjoint seed sets pool exactly into the summary of
their union (the pooled mean, and the pooled sum of squares ``(n1-1) s1^2 + (n2-1) s2^2 + n1 n2 / n (m1-m2)^2``):
the same mean and interval as ``mean_ci`` over all the seeds' values. Every metric of the report (overall, worst
group, each group, epsilon) is a per-run value averaged over seeds, so each pools on its own. A summary of one seed
has no half-width and contributes its value with s = 0 (exact for n = 1).
"""

from __future__ import annotations

import math
from typing import Any

from dplit.report.stats import CONFIDENCE, Estimate, t_quantile
from dplit.sweep.aggregate import Setting


class MergeError(ValueError):
    """Two reports that cannot be merged (overlapping seeds, a summary missing its interval, other confidence)."""


def _std(e: Estimate, confidence: float) -> float:
    if e.n < 2:
        return 0.0
    if e.half is None:
        raise MergeError(f"a summary of {e.n} seeds without its half-width cannot be pooled")
    return e.half * math.sqrt(e.n) / t_quantile((1 + confidence) / 2, e.n - 1)


def pool(a: Estimate, b: Estimate, confidence: float = CONFIDENCE) -> Estimate:
    """The summary of the union of two disjoint samples, from their summaries (exact)."""
    n = a.n + b.n
    mean = (a.n * a.mean + b.n * b.mean) / n
    sum_sq = (a.n - 1) * _std(a, confidence) ** 2 + (b.n - 1) * _std(b, confidence) ** 2
    sum_sq += a.n * b.n / n * (a.mean - b.mean) ** 2
    sem = math.sqrt(sum_sq / (n - 1)) / math.sqrt(n)
    return Estimate(mean, t_quantile((1 + confidence) / 2, n - 1) * sem if sem > 0 else 0.0, n)


def _estimate(data: dict[str, Any] | None) -> Estimate | None:
    if data is None or data.get("mean") is None:
        return None
    return Estimate(float(data["mean"]), None if data.get("half_width") is None else float(data["half_width"]),
                    int(data["n"]))  # fmt: skip


def settings_from_json(report: dict[str, Any]) -> list[Setting]:
    """The settings of a ``sweep_report.json`` (as ``dplit.sweep.aggregate.to_json`` wrote them)."""
    out = []
    for s in report["settings"]:
        worst = _estimate(s["worst_group_acc"])
        if worst is None:
            raise MergeError(f"setting {s['method']}: no worst_group_acc in the report")
        groups = {g: e for g, d in s["group_acc"].items() if (e := _estimate(d)) is not None}
        out.append(Setting(method=s["method"], target_epsilon=s["target_epsilon"],
                           noise_multiplier=s["noise_multiplier"], cells=list(s["cells"]), seeds=list(s["seeds"]),
                           epsilon=_estimate(s.get("epsilon")), overall=_estimate(s.get("overall_acc")), worst=worst,
                           groups=groups))  # fmt: skip
    return out


def _pool_optional(a: Estimate | None, b: Estimate | None, confidence: float) -> Estimate | None:
    if a is None or b is None:
        return a if b is None else b
    return pool(a, b, confidence)


def merge_settings(first: list[Setting], second: list[Setting], confidence: float = CONFIDENCE) -> list[Setting]:
    """Each setting of either report, pooled where both have it (matched by method and budget); the order of
    ``first``, then settings only ``second`` has. Refuses settings whose seed sets overlap."""
    key = lambda s: (s.method, s.target_epsilon, s.noise_multiplier)  # noqa: E731
    by_key = {key(s): s for s in second}
    merged: list[Setting] = []
    for a in first:
        b = by_key.pop(key(a), None)
        if b is None:
            merged.append(a)
            continue
        shared = set(a.seeds) & set(b.seeds)
        if shared or set(a.cells) & set(b.cells):
            raise MergeError(
                f"setting {a.label}: seeds {sorted(shared, key=str)} are in both reports; merge reports of disjoint "
                "seeds (the second sweep's --seeds must leave out the first one's)"
            )
        if set(a.groups) != set(b.groups):
            raise MergeError(f"setting {a.label}: the reports have different groups ({sorted(a.groups)} vs "
                             f"{sorted(b.groups)})")  # fmt: skip
        merged.append(Setting(method=a.method, target_epsilon=a.target_epsilon, noise_multiplier=a.noise_multiplier,
                              cells=a.cells + b.cells, seeds=a.seeds + b.seeds,
                              epsilon=_pool_optional(a.epsilon, b.epsilon, confidence),
                              overall=_pool_optional(a.overall, b.overall, confidence),
                              worst=pool(a.worst, b.worst, confidence),
                              groups={g: pool(e, b.groups[g], confidence) for g, e in a.groups.items()}))  # fmt: skip
    return merged + list(by_key.values())


def check_confidence(*reports: dict[str, Any]) -> float:
    """The reports' common confidence level (a merge needs one)."""
    levels = {float(r.get("confidence", CONFIDENCE)) for r in reports}
    if len(levels) != 1:
        raise MergeError(f"the reports use different confidence levels {sorted(levels)}")
    return levels.pop()


__all__ = ["MergeError", "check_confidence", "merge_settings", "pool", "settings_from_json"]
