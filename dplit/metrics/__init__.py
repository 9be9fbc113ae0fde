"""Torchmetrics-style per-subgroup metrics (DDP-safe states) and the pure functions behind them."""

from dplit.metrics.functional import (
    auc_gap,
    binary_auc,
    binary_group_stats,
    binary_rates,
    demographic_parity_difference,
    equalized_odds_difference,
    group_auc,
    group_rates,
    group_stats,
    max_gap,
    worst_group,
)
from dplit.metrics.subgroup import GroupMetrics, flatten_group_metrics, intersect_groups, intersection_names

__all__ = [
    "GroupMetrics",
    "auc_gap",
    "binary_auc",
    "binary_group_stats",
    "binary_rates",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "flatten_group_metrics",
    "group_auc",
    "group_rates",
    "group_stats",
    "intersect_groups",
    "intersection_names",
    "max_gap",
    "worst_group",
]
