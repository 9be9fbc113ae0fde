"""Pure functions on per-group sufficient statistics: the maths behind :class:`~dplit.metrics.GroupMetrics`.

Per-group tensors have shape ``[G]`` (one entry per group id). A rate whose denominator is 0 -- a group with no
examples, or no positives for a TPR -- is NaN, never 0, so a missing group cannot pass for a perfect or a
hopeless one. Summaries (worst group, gaps) are taken over the groups whose value is not NaN; with too few such
groups (fewer than 1 for a worst group, fewer than 2 for a gap) they are NaN.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _per_group_sum(values: Tensor, group: Tensor, num_groups: int, dtype: torch.dtype) -> Tensor:
    """Sum of ``values`` [B] per group id in ``group`` [B]; a new tensor [G] (deterministic on CUDA)."""
    out = torch.zeros(num_groups, dtype=dtype, device=group.device)
    return out.index_add_(0, group, values.to(dtype))


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` in float64, NaN where ``den == 0``."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den, torch.full_like(num, math.nan))  # x/0 is computed, then masked


def group_stats(
    preds: Tensor, target: Tensor, group: Tensor, num_groups: int, loss: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-group sufficient statistics of one batch for accuracy and mean loss.

    Args:
        preds: Predicted class ids, shape [B].
        target: True class ids, shape [B].
        group: Group ids in ``[0, num_groups)``, shape [B].
        num_groups: Number of groups G.
        loss: Optional per-example loss, shape [B].

    Returns:
        ``count``, ``correct``, ``loss_count`` (int64 [G]) and ``loss_sum`` (float64 [G]); ``loss_count`` is 0
        when no loss is given.
    """
    group = group.long()
    stats = {
        "count": _per_group_sum(torch.ones_like(group), group, num_groups, torch.long),
        "correct": _per_group_sum((preds == target).long(), group, num_groups, torch.long),
    }
    if loss is None:
        stats["loss_sum"] = torch.zeros(num_groups, dtype=torch.float64, device=group.device)
        stats["loss_count"] = torch.zeros(num_groups, dtype=torch.long, device=group.device)
    else:
        stats["loss_sum"] = _per_group_sum(loss.detach(), group, num_groups, torch.float64)
        stats["loss_count"] = stats["count"].clone()
    return stats


def binary_group_stats(
    preds: Tensor, target: Tensor, group: Tensor, num_groups: int, positive_class: int = 1
) -> dict[str, Tensor]:
    """Per-group confusion counts of one batch for a binary task.

    Args:
        preds: Predicted class ids, shape [B].
        target: True class ids, shape [B].
        group: Group ids in ``[0, num_groups)``, shape [B].
        num_groups: Number of groups G.
        positive_class: The class id counted as positive.

    Returns:
        ``tp``, ``fp``, ``tn``, ``fn`` (int64 [G]).
    """
    group = group.long()
    pred_pos, true_pos = preds == positive_class, target == positive_class
    cells = {
        "tp": pred_pos & true_pos,
        "fp": pred_pos & ~true_pos,
        "tn": ~pred_pos & ~true_pos,
        "fn": ~pred_pos & true_pos,
    }
    return {name: _per_group_sum(mask.long(), group, num_groups, torch.long) for name, mask in cells.items()}


def group_rates(
    count: Tensor, correct: Tensor, loss_sum: Tensor, loss_count: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-group accuracy and mean loss from sufficient statistics.

    Args:
        count: Examples per group, [G].
        correct: Correct predictions per group, [G].
        loss_sum: Sum of per-example losses per group, [G].
        loss_count: Examples whose loss was summed, [G]; defaults to ``count``.

    Returns:
        ``acc`` and ``loss`` (float64 [G], NaN where their denominator is 0) and ``count`` (as given).
    """
    loss_count = count if loss_count is None else loss_count
    return {"acc": _safe_div(correct, count), "loss": _safe_div(loss_sum, loss_count), "count": count}


def binary_rates(tp: Tensor, fp: Tensor, tn: Tensor, fn: Tensor) -> dict[str, Tensor]:
    """Per-group true/false positive rates and positive (selection) rate from confusion counts.

    Args:
        tp: True positives per group, [G].
        fp: False positives per group, [G].
        tn: True negatives per group, [G].
        fn: False negatives per group, [G].

    Returns:
        ``tpr`` = tp / (tp + fn), ``fpr`` = fp / (fp + tn), ``positive_rate`` = (tp + fp) / count; float64 [G],
        NaN where the denominator is 0.
    """
    return {
        "tpr": _safe_div(tp, tp + fn),
        "fpr": _safe_div(fp, fp + tn),
        "positive_rate": _safe_div(tp + fp, tp + fp + tn + fn),
    }


def binary_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC as the Mann-Whitney U statistic, ties counted as 1/2 (average ranks).

    Args:
        scores: Scores of the positive class, shape [N].
        labels: Nonzero (or True) for positives, shape [N].

    Returns:
        The AUC, or NaN if either class is absent.
    """
    scores, pos = scores.detach().reshape(-1).double(), labels.reshape(-1).bool()
    n_pos = int(pos.sum())
    n_neg = pos.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # 1-based rank of the last member of each block of tied scores
    ranks = (last - (counts.double() - 1) / 2)[inverse]  # average rank of each score
    u = ranks[pos].sum().item() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)


def group_auc(scores: Tensor, labels: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Per-group ROC AUC (:func:`binary_auc` within each group).

    Args:
        scores: Scores of the positive class, shape [N].
        labels: Nonzero (or True) for positives, shape [N].
        group: Group ids in ``[0, num_groups)``, shape [N].
        num_groups: Number of groups G.

    Returns:
        float64 [G]; NaN for a group that lacks positives or negatives (or examples).
    """
    aucs = [binary_auc(scores[group == g], labels[group == g]) for g in range(num_groups)]
    return torch.tensor(aucs, dtype=torch.float64, device=scores.device)


def _present(values: Tensor) -> Tensor:
    """The non-NaN entries of ``values`` as float64."""
    values = values.double()
    return values[~torch.isnan(values)]


def worst_group(values: Tensor) -> Tensor:
    """Minimum over non-missing groups (0-dim float64); NaN if every group is missing."""
    present = _present(values)
    return present.min() if present.numel() >= 1 else torch.tensor(math.nan, dtype=torch.float64, device=values.device)


def max_gap(values: Tensor) -> Tensor:
    """Max minus min over non-missing groups (0-dim float64); NaN with fewer than 2 non-missing groups."""
    present = _present(values)
    if present.numel() < 2:
        return torch.tensor(math.nan, dtype=torch.float64, device=values.device)
    return present.max() - present.min()


def equalized_odds_difference(tpr: Tensor, fpr: Tensor) -> Tensor:
    """Larger of the TPR gap and the FPR gap (fairlearn's ``equalized_odds_difference``, worst case).

    NaN if either gap is undefined (fewer than 2 groups with a defined TPR, or with a defined FPR).
    """
    return torch.maximum(max_gap(tpr), max_gap(fpr))  # NaN propagates


def demographic_parity_difference(positive_rate: Tensor) -> Tensor:
    """Gap between the largest and smallest per-group positive (selection) rate."""
    return max_gap(positive_rate)


def auc_gap(auc: Tensor) -> Tensor:
    """Gap between the largest and smallest per-group AUC."""
    return max_gap(auc)


__all__ = [
    "auc_gap",
    "binary_auc",
    "binary_group_stats",
    "binary_rates",
    "demographic_parity_difference",
    "equalized_odds_difference",
    "group_auc",
    "group_rates",
    "group_stats",
    "max_gap",
    "worst_group",
]
