"""GroupMetrics: per-subgroup accuracy, loss and binary fairness metrics as a DDP-safe torchmetrics ``Metric``.

``GroupMetrics.compute()`` returns per-group tensors [G] -- ``acc``, ``loss``, ``count`` and, for binary tasks,
``tpr``, ``fpr``, ``positive_rate``, ``auc`` -- and 0-dim summaries over the groups that are not missing:
``worst_group_acc``, ``acc_gap`` and, for binary tasks, ``equalized_odds_diff``, ``demographic_parity_diff``,
``auc_gap``. A group with no examples is NaN in every per-group tensor (count 0) and never enters a summary.

:func:`flatten_group_metrics` turns that dict into the stable names that are logged (``prefix`` is e.g. ``val``):

- ``{prefix}/{metric}/group={name}`` for each per-group value, e.g. ``val/acc/group=female``,
  ``val/tpr/group=8``; groups with no examples, and NaN values (a TPR in a group without positives, an AUC in
  a group with one class), are left out, not logged as 0;
- ``{prefix}/missing_groups``: how many groups had no examples;
- ``{prefix}/{summary}`` for each summary, e.g. ``val/worst_group_acc``, ``val/acc_gap``,
  ``val/equalized_odds_diff``, ``val/demographic_parity_diff``, ``val/auc_gap`` (NaN when undefined).

Multi-label tasks (``GroupMetrics(label_names=[...])``, targets [B, L] with -1 for ignored labels): ``acc`` is the
accuracy of the observed label decisions, and the AUC entries of :mod:`dplit.metrics.multilabel` (macro ``auc``
per group, ``auc/label=<name>`` per group, ``auc_gap``, ``worst_group_auc``, ``overall_auc``, ...) replace the
binary ones.

Intersectional groups (e.g. sex x race) are ordinary groups whose ids come from :func:`intersect_groups` and whose
names come from :func:`intersection_names` (``"female&Black"``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from dplit.metrics.functional import (
    auc_gap,
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
from dplit.metrics.multilabel import IGNORE, check_label_names, multilabel_group_stats, multilabel_results

_SUM_STATES = ("count", "correct", "loss_sum", "loss_count")
_BINARY_STATES = ("tp", "fp", "tn", "fn")


def _check_ids(ids: Tensor, size: int, what: str) -> None:
    """Raise ValueError naming the first id of ``ids`` outside ``[0, size)``."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what} must be integer ids, got dtype {ids.dtype}")
    bad = (ids < 0) | (ids >= size)
    if ids.numel() and bool(bad.any()):
        raise ValueError(f"{what} id {int(ids[bad][0])} is out of range: expected ids in [0, {size}) ({size} groups)")


def _cat(state: list[Tensor] | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A list state as one tensor (after a DDP sync it is already one)."""
    if isinstance(state, Tensor):
        return state
    return torch.cat(state) if state else torch.zeros(0, dtype=dtype, device=device)


class GroupMetrics(Metric):
    """Per-group accuracy and loss, and for binary tasks TPR, FPR, positive rate and AUC, with gap summaries.

    Sufficient statistics are summed per group (``dist_reduce_fx="sum"``); AUC keeps the scores
    (``dist_reduce_fx="cat"``). See the module docstring for the keys of :meth:`compute`.

    Args:
        num_groups: Number of groups G; group ids are ``0..G-1``.
        num_classes: Number of classes; binary metrics are computed when it is 2.
        positive_class: Class id counted as positive for binary metrics.
        compute_auc: Keep scores for a per-group AUC (binary and multi-label tasks; ignored otherwise).
        label_names: Multi-label task with these L labels (``num_classes`` is then ignored): preds, targets and
            probs are [B, L]; targets 1, 0 or -1 (ignored).
        **kwargs: Passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    count: Tensor
    correct: Tensor
    loss_sum: Tensor
    loss_count: Tensor
    tp: Tensor
    fp: Tensor
    tn: Tensor
    fn: Tensor
    scores: list[Tensor]
    labels: list[Tensor]
    groups: list[Tensor]
    observed: Tensor

    def __init__(
        self,
        num_groups: int,
        num_classes: int,
        positive_class: int = 1,
        compute_auc: bool = True,
        label_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0 <= positive_class < num_classes:
            raise ValueError(f"positive_class must be in [0, {num_classes}), got {positive_class}")
        self.num_groups, self.num_classes, self.positive_class = num_groups, num_classes, positive_class
        self.label_names = None if label_names is None else list(label_names)
        if self.label_names is not None:
            check_label_names(self.label_names)
        self.binary = num_classes == 2 and self.label_names is None
        self.compute_auc = compute_auc and (self.binary or self.label_names is not None)
        extra = _BINARY_STATES if self.binary else ("observed",) if self.label_names is not None else ()
        for name in _SUM_STATES + extra:
            dtype = torch.float64 if name == "loss_sum" else torch.long
            self.add_state(name, torch.zeros(num_groups, dtype=dtype), dist_reduce_fx="sum")
        if self.compute_auc:
            for name in ("scores", "labels", "groups"):
                self.add_state(name, [], dist_reduce_fx="cat")

    def update(
        self,
        preds: Tensor,
        target: Tensor,
        group: Tensor,
        loss: Tensor | None = None,
        probs: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            preds: Predicted class ids, shape [B].
            target: True class ids, shape [B].
            group: Group ids in ``[0, num_groups)``, shape [B].
            loss: Optional per-example loss, shape [B] (the group mean loss is NaN where none was given).
            probs: Class probabilities, shape [B, C]; needed when AUC is computed (its scores are
                ``probs[:, positive_class]``).

        Raises:
            ValueError: On mismatched shapes, a group id out of range, or missing ``probs`` when AUC is computed.
        """
        batch = group.shape[0] if group.ndim == 1 else -1
        if self.label_names is not None:
            self._update_multilabel(preds, target, group, batch, loss, probs)
            return
        for name, value in (("preds", preds), ("target", target), ("group", group), ("loss", loss)):
            if value is not None and tuple(value.shape) != (batch,):
                raise ValueError(
                    f"{name} must have shape [B] like group; got {tuple(value.shape)}, group {group.shape}"
                )
        _check_ids(group, self.num_groups, "group")
        if self.compute_auc and probs is None and batch > 0:
            raise ValueError("GroupMetrics(compute_auc=True) needs probs [B, C]; pass them or set compute_auc=False")
        if probs is not None and tuple(probs.shape) != (batch, self.num_classes):
            raise ValueError(f"probs must have shape [B, {self.num_classes}], got {tuple(probs.shape)}")
        stats = group_stats(preds, target, group, self.num_groups, loss)
        for name in _SUM_STATES:
            setattr(self, name, getattr(self, name) + stats[name])
        if self.binary:
            confusion = binary_group_stats(preds, target, group, self.num_groups, self.positive_class)
            for name in _BINARY_STATES:
                setattr(self, name, getattr(self, name) + confusion[name])
        if self.compute_auc and probs is not None:
            # All in the metric's dtype: a DDP rank that saw no examples syncs empty tensors of that dtype, and
            # gloo/NCCL fail on a dtype mismatch between ranks. Ids stay exact in float32 below 2**24.
            self.scores.append(probs[:, self.positive_class].detach().to(self.dtype))
            self.labels.append((target == self.positive_class).to(self.dtype))
            self.groups.append(group.to(self.dtype))

    def _update_multilabel(self, preds: Tensor, target: Tensor, group: Tensor, batch: int, loss: Tensor | None,
                           probs: Tensor | None) -> None:  # fmt: skip
        labels = len(self.label_names or ())
        for name, value in (("preds", preds), ("target", target), ("probs", probs)):
            if value is not None and tuple(value.shape) != (batch, labels):
                raise ValueError(f"{name} must have shape [B, {labels}] (one column per label) for group "
                                 f"{tuple(group.shape)}; got {tuple(value.shape)}")  # fmt: skip
        if loss is not None and tuple(loss.shape) != (batch,):
            raise ValueError(f"loss must have shape [B] like group; got {tuple(loss.shape)}, group {group.shape}")
        _check_ids(group, self.num_groups, "group")
        bad = (target != 0) & (target != 1) & (target != IGNORE)
        if bool(bad.any()):
            raise ValueError(f"multi-label targets must be 1, 0 or {IGNORE} (ignored); got {target[bad][0].item()}")
        if self.compute_auc and probs is None and batch > 0:
            raise ValueError("GroupMetrics(compute_auc=True) needs probs [B, L]; pass them or set compute_auc=False")
        stats = group_stats(torch.zeros_like(group), torch.ones_like(group), group, self.num_groups, loss)
        stats.update(multilabel_group_stats(preds, target, group, self.num_groups))
        for name in (*_SUM_STATES, "observed"):
            setattr(self, name, getattr(self, name) + stats[name])
        if self.compute_auc and probs is not None:  # flattened rows [B * L]: every rank syncs 1-d tensors
            self.scores.append(probs.detach().reshape(-1).to(self.dtype))
            self.labels.append(target.reshape(-1).to(self.dtype))
            self.groups.append(group.to(self.dtype))

    def compute(self) -> dict[str, Tensor]:
        """Per-group tensors [G] and 0-dim summaries; the keys are listed in the module docstring."""
        out = group_rates(self.count, self.correct, self.loss_sum, self.loss_count)
        if self.label_names is not None:
            out["acc"] = group_rates(self.observed, self.correct, self.loss_sum, self.loss_count)["acc"]
        out["worst_group_acc"] = worst_group(out["acc"])
        out["acc_gap"] = max_gap(out["acc"])
        if self.binary:
            rates = binary_rates(self.tp, self.fp, self.tn, self.fn)
            out.update(rates)
            out["equalized_odds_diff"] = equalized_odds_difference(rates["tpr"], rates["fpr"])
            out["demographic_parity_diff"] = demographic_parity_difference(rates["positive_rate"])
        if self.compute_auc:
            device = self.count.device
            scores, labels, groups = (_cat(s, self.dtype, device) for s in (self.scores, self.labels, self.groups))
            if self.label_names is not None:
                shape = (-1, len(self.label_names))
                out.update(multilabel_results(scores.reshape(shape), labels.reshape(shape), groups.long(),
                                              self.num_groups, self.label_names))  # fmt: skip
                return out
            out["auc"] = group_auc(scores, labels, groups.long(), self.num_groups)
            out["auc_gap"] = auc_gap(out["auc"])
        return out


def _name(prefix: str, *parts: str) -> str:
    return "/".join((prefix, *parts) if prefix else parts)


def flatten_group_metrics(result: dict[str, Tensor], group_names: list[str], prefix: str) -> dict[str, float]:
    """Flatten :meth:`GroupMetrics.compute` output to loggable floats under stable names.

    Args:
        result: Per-group tensors [G] and 0-dim summaries; ``count`` marks missing groups (count 0).
        group_names: Name of each group id (length G).
        prefix: Leading name part, e.g. ``"val"`` or ``"test"`` (``""`` for none).

    Returns:
        ``{prefix}/{metric}/group={name}`` for every non-missing, non-NaN per-group value,
        ``{prefix}/missing_groups``, and ``{prefix}/{summary}`` for every summary.
    """
    num_groups = len(group_names)
    count = result.get("count")
    present = [True] * num_groups if count is None else [c > 0 for c in count.tolist()]
    out: dict[str, float] = {}
    for metric, value in result.items():
        if value.ndim == 0:
            out[_name(prefix, metric)] = float(value)
            continue
        if tuple(value.shape) != (num_groups,):
            raise ValueError(f"{metric} has shape {tuple(value.shape)}, expected [{num_groups}] (one per group name)")
        for name, keep, v in zip(group_names, present, value.tolist(), strict=True):
            if keep and not math.isnan(v):
                out[_name(prefix, metric, f"group={name}")] = float(v)
    out[_name(prefix, "missing_groups")] = float(num_groups - sum(present))
    return out


def intersect_groups(groups: Tensor, sizes: list[int]) -> Tensor:
    """Combine several group attributes into one intersectional id (mixed radix, first attribute most significant).

    Args:
        groups: Group id of each attribute, shape [B, A].
        sizes: Number of groups of each attribute (length A).

    Returns:
        Ids in ``[0, prod(sizes))``, shape [B], matching the order of :func:`intersection_names`.
    """
    if groups.ndim != 2 or groups.shape[1] != len(sizes):
        raise ValueError(f"groups must have shape [B, {len(sizes)}] (one column per size), got {tuple(groups.shape)}")
    ids = torch.zeros(groups.shape[0], dtype=torch.long, device=groups.device)
    for attr, size in enumerate(sizes):
        _check_ids(groups[:, attr], size, f"attribute {attr} group")
        ids = ids * size + groups[:, attr].long()
    return ids


def intersection_names(names_per_attr: list[list[str]], sep: str = "&") -> list[str]:
    """Names of the intersectional groups of :func:`intersect_groups`, e.g. ``["female&Black", ...]``."""
    return [sep.join(combo) for combo in itertools.product(*names_per_attr)]


__all__ = ["GroupMetrics", "flatten_group_metrics", "intersect_groups", "intersection_names"]
