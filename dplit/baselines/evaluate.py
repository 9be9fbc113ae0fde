"""Per-group metrics of a baseline's predictions under the names SubgroupMetrics logs, from ``dplit.metrics``.

The views mirror :class:`~dplit.callbacks.SubgroupMetrics`: the primary attribute as ``<stage>/<metric>/group=<n>``,
other attributes as ``<stage>/<metric>/<attr>=<n>``, their intersection (when asked) as ``<a>&<b>=<x>&<y>``, and
with several attributes every summary also as ``<stage>/<summary>/<attr>``.
"""

from __future__ import annotations

import numpy as np
import torch

from dplit.metrics import GroupMetrics, flatten_group_metrics, intersect_groups, intersection_names


def group_metrics(
    probs: np.ndarray,
    y: np.ndarray,
    group: np.ndarray,
    attributes: dict[str, list[str]],
    stage: str,
    intersections: bool = False,
    compute_auc: bool = True,
) -> dict[str, float]:
    """Overall ``<stage>/acc`` and ``<stage>/loss`` plus the per-group metrics of ``probs`` [N, C] against ``y``.

    Args:
        probs: Predicted class probabilities [N, C].
        y: True classes [N].
        group: Group ids [N] (one attribute) or [N, A] (column order = ``attributes``).
        attributes: Attribute name -> group names, the first the primary one (the DataModule's).
        stage: ``val`` or ``test``.
        intersections: Also the intersection of all attributes (as ``SubgroupMetrics(intersections=True)``).
        compute_auc: Per-group AUC (binary tasks).
    """
    p = torch.as_tensor(probs, dtype=torch.float64).clamp_min(1e-12)
    target = torch.as_tensor(y, dtype=torch.long)
    groups = torch.as_tensor(group, dtype=torch.long)
    groups = groups.unsqueeze(1) if groups.dim() == 1 else groups
    preds = p.argmax(1)
    loss = -p.gather(1, target[:, None]).squeeze(1).log()  # per-example cross-entropy [N]
    attrs = list(attributes.items())
    sizes = [len(names) for _, names in attrs]
    views: dict[str, tuple[list[str], list[int]]] = {"group": (attrs[0][1], [0])}
    for col, (attr, names) in enumerate(attrs[1:], start=1):
        views[attr] = (names, [col])
    if intersections and len(attrs) > 1:
        views["&".join(a for a, _ in attrs)] = (intersection_names([n for _, n in attrs]), list(range(len(attrs))))
    flat: dict[str, float] = {
        f"{stage}/acc": float((preds == target).double().mean()),
        f"{stage}/loss": float(loss.mean()),
    }
    for view, (names, columns) in views.items():
        ids = groups[:, columns[0]] if len(columns) == 1 else intersect_groups(groups[:, columns], sizes)
        metric = GroupMetrics(len(names), p.shape[1], compute_auc=compute_auc)
        metric.update(preds, target, ids, loss=loss, probs=p.float())
        part = flatten_group_metrics(metric.compute(), names, stage)
        summaries = {k: v for k, v in part.items() if "/group=" not in k}
        if view == "group":
            flat.update(part)
        else:
            flat.update({k.replace("/group=", f"/{view}="): v for k, v in part.items() if "/group=" in k})
        if len(attrs) > 1:
            suffix = "/" + (attrs[0][0] if view == "group" else view)
            flat.update({f"{k}{suffix}": v for k, v in summaries.items()})
    return flat


__all__ = ["group_metrics"]
