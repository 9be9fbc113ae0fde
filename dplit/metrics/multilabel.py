"""Per-group metrics of multi-label tasks (e.g. CheXpert's findings): label accuracy, AUC per label and macro, gaps.

Targets are [N, L] with 1 (positive), 0 (negative) or ``IGNORE`` (-1: an uncertain or missing label that the
data's policy leaves out); ignored entries enter no metric. Per label and group the AUC is over that group's
examples whose label is observed (NaN without both classes); a group's **macro AUC** is the mean of its defined
per-label AUCs (NaN when none is defined), as in Berrada et al. 2023's CheXpert table (mean AUC over findings).

:func:`multilabel_results` returns, next to :class:`~dplit.metrics.GroupMetrics`' ``count``/``acc``/``loss``:

- ``auc`` [G]: the macro AUC of each group; ``auc/label=<name>`` [G]: one label's AUC in each group;
- ``auc_gap``, ``worst_group_auc``: over the groups' macro AUCs; ``auc_gap/label=<name>``: one label's gap;
- ``overall_auc`` and ``overall_auc/label=<name>``: all groups pooled (the headline number).

Logged by SubgroupMetrics as ``val/auc/group=<g>``, ``val/auc/label=<name>/group=<g>``, ``val/auc_gap``,
``val/auc_gap/label=<name>``, ``val/worst_group_auc``, ``val/overall_auc``, ``val/overall_auc/label=<name>``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dplit.metrics.functional import _per_group_sum, binary_auc, max_gap, worst_group

IGNORE = -1


def check_label_names(names: list[str]) -> None:
    """Label names must be unique, non-empty and free of ``/`` (they become parts of metric names)."""
    if not names or len(set(names)) != len(names) or any(not n or "/" in n for n in names):
        raise ValueError(f"label_names must be unique non-empty names without '/', got {names}")


def multilabel_group_stats(preds: Tensor, target: Tensor, group: Tensor, num_groups: int) -> dict[str, Tensor]:
    """Per-group counts of one batch: ``correct`` and ``observed`` label decisions (int64 [G]).

    Args:
        preds: 0/1 decisions, shape [B, L].
        target: 1, 0 or ``IGNORE``, shape [B, L].
        group: Group ids, shape [B].
        num_groups: Number of groups G.
    """
    observed = target != IGNORE  # [B, L]
    correct = (preds.long() == target.long()) & observed
    group = group.long()
    return {
        "correct": _per_group_sum(correct.sum(1), group, num_groups, torch.long),
        "observed": _per_group_sum(observed.sum(1), group, num_groups, torch.long),
    }


def label_group_auc(scores: Tensor, target: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """AUC of each label in each group, float64 [L, G] (NaN where a group lacks a class of that label).

    Args:
        scores: Scores, shape [N, L].
        target: 1, 0 or ``IGNORE``, shape [N, L].
        group: Group ids, shape [N].
        num_groups: Number of groups G.
    """
    out = torch.full((target.shape[1], num_groups), math.nan, dtype=torch.float64, device=scores.device)
    for label in range(target.shape[1]):
        seen = target[:, label] != IGNORE
        for g in range(num_groups):
            rows = seen & (group == g)
            out[label, g] = binary_auc(scores[rows, label], target[rows, label] == 1)
    return out


def _nanmean(values: Tensor, dim: int) -> Tensor:
    """Mean over ``dim`` of the non-NaN entries (NaN where there is none)."""
    present = ~torch.isnan(values)
    total = torch.where(present, values, torch.zeros_like(values)).sum(dim)
    count = present.sum(dim)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, math.nan))


def multilabel_results(scores: Tensor, target: Tensor, group: Tensor, num_groups: int,
                       label_names: list[str]) -> dict[str, Tensor]:  # fmt: skip
    """The AUC entries listed in the module docstring, from one epoch's scores [N, L], targets [N, L], groups [N]."""
    per_label = label_group_auc(scores, target, group, num_groups)  # [L, G]
    macro = _nanmean(per_label, 0)  # [G]
    out: dict[str, Tensor] = {"auc": macro, "auc_gap": max_gap(macro), "worst_group_auc": worst_group(macro)}
    pooled = label_group_auc(scores, target, torch.zeros_like(group), 1)[:, 0]  # [L]
    out["overall_auc"] = _nanmean(pooled, 0)
    for index, name in enumerate(label_names):
        out[f"auc/label={name}"] = per_label[index]
        out[f"auc_gap/label={name}"] = max_gap(per_label[index])
        out[f"overall_auc/label={name}"] = pooled[index]
    return out


__all__ = ["IGNORE", "check_label_names", "label_group_auc", "multilabel_group_stats", "multilabel_results"]
