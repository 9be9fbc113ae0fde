"""Per-group AUC of multi-label tasks (per label, macro, gaps) against sklearn's roc_auc_score; the DDP sync path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from dplit.metrics import GroupMetrics, flatten_group_metrics
from dplit.tasks import MultiLabelTask
from dplit.tasks.vision import MaskedBCEWithLogits

LABELS = ["Atelectasis", "Edema", "Pleural Effusion"]
GROUPS = ["female", "male", "other"]


@pytest.fixture
def data() -> dict[str, torch.Tensor]:
    """60 examples, 3 labels with some -1 (ignored), 3 groups; group 2 sees only negatives of label 1."""
    gen = torch.Generator().manual_seed(0)
    n = 60
    target = torch.randint(0, 2, (n, 3), generator=gen)
    target[torch.rand(n, 3, generator=gen) < 0.15] = -1
    group = torch.arange(n) % 3
    target[group == 2, 1] = torch.where(target[group == 2, 1] == -1, -1, 0)  # label 1 undefined in group 2
    probs = (0.35 * target.clamp(min=0) + 0.65 * torch.rand(n, 3, generator=gen)).round(decimals=1)  # ties
    preds = (probs >= 0.5).long()
    return {"preds": preds, "target": target, "group": group, "probs": probs, "loss": torch.rand(n, generator=gen)}


def _sk_auc(d: dict[str, torch.Tensor], label: int, group: int | None) -> float:
    rows = d["target"][:, label] != -1
    if group is not None:
        rows &= d["group"] == group
    y, s = d["target"][rows, label].numpy(), d["probs"][rows, label].numpy()
    return math.nan if len(set(y)) < 2 else float(roc_auc_score(y, s))


def test_per_label_macro_and_gap_match_sklearn(data: dict[str, torch.Tensor]) -> None:
    metric = GroupMetrics(3, num_classes=2, label_names=LABELS)
    half = 25
    metric.update(**{k: v[:half] for k, v in data.items()})
    metric.update(**{k: v[half:] for k, v in data.items()})
    out = metric.compute()
    reference = np.array([[_sk_auc(data, lab, g) for g in range(3)] for lab in range(3)])  # [L, G]
    assert math.isnan(reference[1, 2])  # the undefined cell stays NaN, not 0 or 0.5
    for lab, name in enumerate(LABELS):
        np.testing.assert_allclose(out[f"auc/label={name}"].numpy(), reference[lab], rtol=1e-12)
        assert out[f"overall_auc/label={name}"].item() == pytest.approx(_sk_auc(data, lab, None))
        defined = reference[lab][~np.isnan(reference[lab])]
        assert out[f"auc_gap/label={name}"].item() == pytest.approx(defined.max() - defined.min())
    macro = np.nanmean(reference, axis=0)  # [G]: group 2's macro AUC is over its 2 defined labels
    np.testing.assert_allclose(out["auc"].numpy(), macro, rtol=1e-12)
    assert out["auc_gap"].item() == pytest.approx(macro.max() - macro.min())
    assert out["worst_group_auc"].item() == pytest.approx(macro.min())
    assert out["overall_auc"].item() == pytest.approx(np.mean([_sk_auc(data, lab, None) for lab in range(3)]))
    # label accuracy over the observed entries only; counts are examples
    seen = data["target"] != -1
    for g in range(3):
        rows = data["group"] == g
        correct = ((data["preds"] == data["target"]) & seen)[rows].sum().item()
        assert out["acc"][g].item() == pytest.approx(correct / seen[rows].sum().item())
        assert out["count"][g].item() == rows.sum().item()
        assert out["loss"][g].item() == pytest.approx(data["loss"][rows].double().mean().item())


def test_flattened_names(data: dict[str, torch.Tensor]) -> None:
    metric = GroupMetrics(3, num_classes=2, label_names=LABELS)
    metric.update(**data)
    flat = flatten_group_metrics(metric.compute(), GROUPS, "val")
    assert {"val/auc/group=female", "val/auc/label=Edema/group=male", "val/auc_gap", "val/worst_group_auc",
            "val/auc_gap/label=Edema", "val/overall_auc", "val/overall_auc/label=Edema", "val/acc/group=other",
            "val/acc_gap", "val/worst_group_acc"} <= set(flat)  # fmt: skip
    assert "val/auc/label=Edema/group=other" not in flat  # undefined: left out, not logged as 0
    assert not [k for k in flat if "tpr" in k or "equalized" in k]  # binary-only metrics are not made up


def test_ddp_sync_with_an_empty_rank(data: dict[str, torch.Tensor]) -> None:
    """torchmetrics' sync path: states are 1-d, so a rank without examples (an empty 1-d tensor) concatenates."""
    reductions = {n: f.__name__ for n, f in GroupMetrics(3, 2, label_names=LABELS)._reductions.items() if f}
    assert reductions["observed"] == "dim_zero_sum" and reductions["scores"] == "dim_zero_cat"

    def gather(t: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        # rank 1 saw nothing: zeros for the per-group sums [G], empty tensors for the concatenated scores
        return [t, torch.zeros_like(t) if t.shape == (3,) else t.new_zeros(0)]

    synced = GroupMetrics(3, 2, label_names=LABELS, dist_sync_fn=gather, distributed_available_fn=lambda: True)
    synced.update(**data)
    plain = GroupMetrics(3, 2, label_names=LABELS)
    plain.update(**data)
    a, b = synced.compute(), plain.compute()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True)
    assert {t.dim() for t in plain.scores} == {1}


def test_bad_multilabel_input(data: dict[str, torch.Tensor]) -> None:
    metric = GroupMetrics(3, 2, label_names=LABELS)
    with pytest.raises(ValueError, match=r"shape \[B, 3\]"):
        metric.update(data["preds"][:, :2], data["target"], data["group"], probs=data["probs"])
    with pytest.raises(ValueError, match="1, 0 or -1"):
        metric.update(data["preds"], data["target"] * 2, data["group"], probs=data["probs"])
    with pytest.raises(ValueError, match="label_names"):
        GroupMetrics(3, 2, label_names=["a", "a"])


def test_masked_bce_and_task_outputs() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 0.0, 0.0]])
    target = torch.tensor([[1, -1, 0], [-1, -1, -1]])
    loss = MaskedBCEWithLogits(reduction="none")(logits, target)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected0 = (bce(logits[0, 0], torch.tensor(1.0)) + bce(logits[0, 2], torch.tensor(0.0))) / 2
    torch.testing.assert_close(loss, torch.stack([expected0, torch.tensor(0.0)]))
    assert MaskedBCEWithLogits()(logits[:0], target[:0]).item() == 0.0  # empty Poisson batch
    task = MultiLabelTask(torch.nn.Identity())
    torch.testing.assert_close(task.per_example_loss(logits, target), loss)
    preds, probs = task.predict(logits)
    assert preds.tolist() == [[1, 0, 1], [1, 1, 1]] and probs.shape == (2, 3)
    assert task.label_accuracy(preds, target).item() == pytest.approx(1 / 2)  # 2 observed, 1 right
