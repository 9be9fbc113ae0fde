"""GroupMetrics and its pure functions against independent references: fairlearn, sklearn, and numpy loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, roc_auc_score

from dplit.metrics import (
    GroupMetrics,
    binary_auc,
    flatten_group_metrics,
    group_auc,
    intersect_groups,
    intersection_names,
    max_gap,
    worst_group,
)

NUM_GROUPS = 5
EMPTY = 3  # the group with no examples
SIZES = [400, 60, 150, 0, 25]  # unequal group sizes
NAMES = ["a", "b", "c", "empty", "e"]


def _binary_data(seed: int = 0) -> dict[str, torch.Tensor]:
    """Binary predictions with group-dependent quality, tied scores, and group EMPTY absent."""
    rng = np.random.default_rng(seed)
    group = rng.permutation(np.repeat(np.arange(NUM_GROUPS), SIZES))
    target = rng.integers(0, 2, group.size)
    noise = np.array([0.5, 1.0, 2.0, 0.0, 3.0])[group]
    p1 = 1 / (1 + np.exp(-(2 * target - 1 + noise * rng.normal(size=group.size))))
    p1 = np.round(p1, 1)  # heavy ties in the scores
    probs = np.stack([1 - p1, p1], axis=1)
    preds = (p1 > 0.5).astype(np.int64)
    loss = rng.exponential(size=group.size)
    return {
        "preds": torch.as_tensor(preds),
        "target": torch.as_tensor(target),
        "group": torch.as_tensor(group),
        "loss": torch.as_tensor(loss, dtype=torch.float32),
        "probs": torch.as_tensor(probs, dtype=torch.float32),
    }


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return _binary_data()


@pytest.fixture(scope="module")
def result(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    metric = GroupMetrics(NUM_GROUPS, num_classes=2)
    metric.update(**data)
    return metric.compute()


def _present_groups(data: dict[str, torch.Tensor]) -> list[int]:
    return sorted(set(data["group"].tolist()))


def test_binary_per_group_matches_fairlearn(data: dict[str, torch.Tensor], result: dict[str, torch.Tensor]) -> None:
    y, yhat, g = data["target"].numpy(), data["preds"].numpy(), data["group"].numpy()
    metrics = {"acc": accuracy_score, "tpr": true_positive_rate, "fpr": false_positive_rate}
    metrics["positive_rate"] = selection_rate
    frame = MetricFrame(metrics=metrics, y_true=y, y_pred=yhat, sensitive_features=g)
    assert sorted(frame.by_group.index.tolist()) == _present_groups(data) == [0, 1, 2, 4]
    for name in metrics:
        for grp, expected in frame.by_group[name].items():
            assert result[name][grp].item() == pytest.approx(expected, abs=1e-12), (name, grp)
        assert math.isnan(result[name][EMPTY].item()), name  # missing, not 0
    assert result["count"].tolist() == SIZES
    # summaries exclude the empty group; fairlearn's own definitions
    assert result["equalized_odds_diff"].item() == pytest.approx(
        equalized_odds_difference(y, yhat, sensitive_features=g)
    )
    dp = demographic_parity_difference(y, yhat, sensitive_features=g)
    assert result["demographic_parity_diff"].item() == pytest.approx(dp)
    assert result["acc_gap"].item() == pytest.approx(frame.difference()["acc"])
    assert result["worst_group_acc"].item() == pytest.approx(frame.group_min()["acc"])


def test_auc_and_loss_match_sklearn_and_numpy(data: dict[str, torch.Tensor], result: dict[str, torch.Tensor]) -> None:
    y, g = data["target"].numpy(), data["group"].numpy()
    scores, loss = data["probs"][:, 1].numpy(), data["loss"].numpy().astype(np.float64)
    assert len(np.unique(scores)) < 12  # ties are exercised
    aucs = {}
    for grp in _present_groups(data):
        m = g == grp
        aucs[grp] = roc_auc_score(y[m], scores[m])
        assert result["auc"][grp].item() == pytest.approx(aucs[grp], abs=1e-12)
        assert result["loss"][grp].item() == pytest.approx(loss[m].mean(), rel=1e-12)
    assert math.isnan(result["auc"][EMPTY].item()) and math.isnan(result["loss"][EMPTY].item())
    assert result["auc_gap"].item() == pytest.approx(max(aucs.values()) - min(aucs.values()))


def test_binary_auc_ties_and_one_class() -> None:
    scores = torch.tensor([0.1, 0.4, 0.4, 0.4, 0.8, 0.8, 0.2, 0.1])
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1])
    assert binary_auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()))
    assert binary_auc(torch.full((4,), 0.3), torch.tensor([1, 1, 0, 0])) == 0.5  # ordinal ranks would give 0
    assert math.isnan(binary_auc(scores, torch.ones(8)))
    assert math.isnan(binary_auc(torch.zeros(0), torch.zeros(0)))
    per_group = group_auc(scores, labels, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 3)
    assert per_group[0].item() == pytest.approx(roc_auc_score([0, 1, 0, 1], [0.1, 0.4, 0.4, 0.4]))
    assert math.isnan(per_group[2].item())


def test_multiclass_accuracy_per_group_matches_numpy_loop() -> None:
    rng = np.random.default_rng(1)
    n, num_classes, num_groups = 500, 4, 4
    group = rng.choice([0, 1, 3], size=n, p=[0.7, 0.2, 0.1])  # group 2 empty
    target = rng.integers(0, num_classes, n)
    preds = np.where(rng.random(n) < 0.3 + 0.2 * group, target, rng.integers(0, num_classes, n))
    metric = GroupMetrics(num_groups, num_classes)
    metric.update(torch.as_tensor(preds), torch.as_tensor(target), torch.as_tensor(group))
    out = metric.compute()
    assert set(out) == {"acc", "loss", "count", "worst_group_acc", "acc_gap"}  # no binary metrics, no AUC
    expected = {}
    for grp in range(num_groups):
        members = [i for i in range(n) if group[i] == grp]
        if not members:
            assert math.isnan(out["acc"][grp].item()) and out["count"][grp].item() == 0
            continue
        expected[grp] = sum(preds[i] == target[i] for i in members) / len(members)
        assert out["acc"][grp].item() == pytest.approx(expected[grp], abs=1e-12)
    assert torch.isnan(out["loss"]).all()  # no loss was given
    assert out["worst_group_acc"].item() == pytest.approx(min(expected.values()))
    assert out["acc_gap"].item() == pytest.approx(max(expected.values()) - min(expected.values()))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], equal_nan=True, rtol=1e-12, atol=1e-12, msg=key)


def test_batches_and_empty_batch_equal_one_update(
    data: dict[str, torch.Tensor], result: dict[str, torch.Tensor]
) -> None:
    metric = GroupMetrics(NUM_GROUPS, num_classes=2)
    bounds = [0, 0, 7, 100, 101, 400, 630, 635]  # includes B == 0 batches (first, and 635:635)
    for lo, hi in zip(bounds, bounds[1:] + [len(data["group"])], strict=True):
        metric.update(**{k: v[lo:hi] for k, v in data.items()})
    metric.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    _assert_same(metric.compute(), result)


def test_two_simulated_ranks_merge_to_the_single_metric(
    data: dict[str, torch.Tensor], result: dict[str, torch.Tensor]
) -> None:
    half = len(data["group"]) // 2
    ranks = [GroupMetrics(NUM_GROUPS, num_classes=2) for _ in range(2)]
    ranks[0].update(**{k: v[:half] for k, v in data.items()})
    ranks[1].update(**{k: v[half:] for k, v in data.items()})
    # the declared reductions are what DDP sync applies: sums for counts, concatenation for AUC scores
    reductions = {name: fn.__name__ if fn else None for name, fn in ranks[0]._reductions.items()}
    assert {reductions[k] for k in ("count", "correct", "loss_sum", "tp", "fp", "tn", "fn")} == {"dim_zero_sum"}
    assert {reductions[k] for k in ("scores", "labels", "groups")} == {"dim_zero_cat"}
    # manual "all-reduce": sum the sum-states, concatenate the list states, then compute
    manual = GroupMetrics(NUM_GROUPS, num_classes=2)
    for name in ("count", "correct", "loss_sum", "loss_count", "tp", "fp", "tn", "fn"):
        setattr(manual, name, getattr(ranks[0], name) + getattr(ranks[1], name))
    for name in ("scores", "labels", "groups"):
        setattr(manual, name, [torch.cat(getattr(ranks[0], name) + getattr(ranks[1], name))])
    manual._update_count = 1
    _assert_same(manual.compute(), result)
    ranks[0].merge_state(ranks[1])
    _assert_same(ranks[0].compute(), result)


def test_torchmetrics_sync_path_with_a_fake_two_rank_gather(data: dict[str, torch.Tensor]) -> None:
    """torchmetrics' own sync (list states become one tensor) with a gather that returns two identical ranks."""
    fake_ddp = {"dist_sync_fn": lambda t, group=None: [t, t.clone()], "distributed_available_fn": lambda: True}
    synced = GroupMetrics(NUM_GROUPS, num_classes=2, **fake_ddp)
    synced.update(**data)
    twice = GroupMetrics(NUM_GROUPS, num_classes=2)
    twice.update(**data)
    twice.update(**data)
    _assert_same(synced.compute(), twice.compute())
    empty = GroupMetrics(NUM_GROUPS, num_classes=2, **fake_ddp)
    empty.update(*(torch.zeros(0, dtype=torch.long),) * 3, probs=torch.zeros(0, 2))
    assert torch.isnan(empty.compute()["auc"]).all()


def test_auc_list_states_share_the_metric_dtype(data: dict[str, torch.Tensor]) -> None:
    """Under DDP torchmetrics syncs a rank that saw no examples as empty tensors of ``metric.dtype``; any other
    dtype on the ranks with data makes the gather fail (gloo: "Received data size doesn't match")."""
    metric = GroupMetrics(NUM_GROUPS, num_classes=2)
    metric.update(**data)
    assert {t.dtype for name in ("scores", "labels", "groups") for t in getattr(metric, name)} == {metric.dtype}


def test_flatten_names_skip_missing_groups(result: dict[str, torch.Tensor]) -> None:
    flat = flatten_group_metrics(result, NAMES, "val")
    assert flat["val/acc/group=a"] == pytest.approx(result["acc"][0].item())
    assert flat["val/count/group=e"] == 25.0
    assert flat["val/missing_groups"] == 1.0
    assert not [k for k in flat if "group=empty" in k]
    per_group = {k.split("/")[1] for k in flat if "/group=" in k}
    assert per_group == {"acc", "loss", "count", "tpr", "fpr", "positive_rate", "auc"}
    summaries = {k for k in flat if k.count("/") == 1}
    assert summaries == {
        f"val/{s}" for s in ("worst_group_acc", "acc_gap", "equalized_odds_diff", "demographic_parity_diff", "auc_gap")
    } | {"val/missing_groups"}
    assert all(isinstance(v, float) for v in flat.values())
    digits = flatten_group_metrics(result, [str(i) for i in range(NUM_GROUPS)], "test")
    assert "test/acc/group=4" in digits and "test/acc_gap" in digits
    with pytest.raises(ValueError, match="one per group name"):
        flatten_group_metrics(result, NAMES[:3], "val")


def test_nan_within_present_group_is_skipped_not_zero() -> None:
    metric = GroupMetrics(2, num_classes=2, compute_auc=False)
    # group 1 has only negatives: its TPR is undefined, so the TPR gap and equalized odds are undefined too
    metric.update(torch.tensor([1, 0, 1, 0]), torch.tensor([1, 1, 0, 0]), torch.tensor([0, 0, 1, 1]))
    out = metric.compute()
    assert math.isnan(out["tpr"][1].item()) and out["fpr"][1].item() == 0.5
    assert math.isnan(out["equalized_odds_diff"].item())
    flat = flatten_group_metrics(out, ["x", "y"], "val")
    assert "val/tpr/group=y" not in flat and flat["val/fpr/group=y"] == 0.5 and flat["val/missing_groups"] == 0.0


def test_summaries_need_enough_groups() -> None:
    nan = math.nan
    assert math.isnan(worst_group(torch.tensor([nan, nan])).item())
    assert worst_group(torch.tensor([nan, 0.3])).item() == pytest.approx(0.3)
    assert math.isnan(max_gap(torch.tensor([nan, 0.3])).item())
    assert max_gap(torch.tensor([0.9, nan, 0.3])).item() == pytest.approx(0.6)


def test_update_validation() -> None:
    metric = GroupMetrics(3, num_classes=2)
    ids = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"group id 7 .*\[0, 3\)"):
        metric.update(ids, ids, torch.tensor([0, 7]), probs=torch.rand(2, 2))
    with pytest.raises(ValueError, match="group id -1"):
        metric.update(ids, ids, torch.tensor([-1, 0]), probs=torch.rand(2, 2))
    with pytest.raises(ValueError, match="needs probs"):
        metric.update(ids, ids, ids)
    with pytest.raises(ValueError, match="shape"):
        metric.update(ids, ids[:1], ids, probs=torch.rand(2, 2))
    assert metric.count.sum().item() == 0  # nothing was half-added by the failed updates
    with pytest.raises(ValueError, match="positive_class"):
        GroupMetrics(3, num_classes=2, positive_class=2)


def test_positive_class_zero_swaps_roles() -> None:
    rng = np.random.default_rng(3)
    target, preds, group = (torch.as_tensor(rng.integers(0, k, 200)) for k in (2, 2, 2))
    probs = torch.softmax(torch.as_tensor(rng.normal(size=(200, 2))), dim=1)
    one, zero = GroupMetrics(2, 2, positive_class=1), GroupMetrics(2, 2, positive_class=0)
    one.update(preds, target, group, probs=probs)
    zero.update(1 - preds, 1 - target, group, probs=probs.flip(1))
    _assert_same(one.compute(), zero.compute())


def test_intersections() -> None:
    sex, race = ["female", "male"], ["Black", "White", "Asian"]
    groups = torch.tensor([[0, 0], [0, 2], [1, 0], [1, 2]])
    ids = intersect_groups(groups, [2, 3])
    names = intersection_names([sex, race])
    assert ids.tolist() == [0, 2, 3, 5]
    assert [names[i] for i in ids] == ["female&Black", "female&Asian", "male&Black", "male&Asian"]
    assert len(names) == 6
    three = torch.tensor([[1, 2, 3]])
    assert intersect_groups(three, [2, 3, 4]).item() == (1 * 3 + 2) * 4 + 3 == 23
    with pytest.raises(ValueError, match="attribute 1 group id 3"):
        intersect_groups(torch.tensor([[0, 3]]), [2, 3])
    with pytest.raises(ValueError, match="shape"):
        intersect_groups(torch.tensor([0, 1]), [2, 3])
