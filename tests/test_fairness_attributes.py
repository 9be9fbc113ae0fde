"""SubgroupMetrics: summaries for every group attribute (vs fairlearn), diagnostics through the PerExampleGradients
protocol (no DP callback needed)."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from dp_helpers import TinyData, tiny_task, trainer
from fairlearn.metrics import MetricFrame, demographic_parity_difference, equalized_odds_difference
from sklearn.metrics import accuracy_score
from test_grouped_datamodule import TwoAttributeData

from dplit.callbacks import DifferentialPrivacy, SubgroupMetrics
from dplit.callbacks.diagnostics import PerExampleGradients, find_per_example_gradients


def test_every_attribute_and_the_intersection_get_their_summaries(tmp_path):
    data, task = TwoAttributeData(n=300), tiny_task(dim=4)
    cb = SubgroupMetrics(intersections=True)
    t = trainer(tmp_path, [cb], limit_val_batches=None)
    t.validate(task, datamodule=data)
    val = data.splits()["val"]
    with torch.no_grad():
        pred = task(val.x).argmax(-1).numpy()  # type: ignore[attr-defined]
    y, groups = val.y.numpy(), val.group.numpy()  # type: ignore[attr-defined]
    sex, age = groups[:, 0], groups[:, 1]
    features = {"sex": sex, "age": age, "sex&age": [f"{a}&{b}" for a, b in zip(sex, age, strict=True)]}
    for name, feature in features.items():
        frame = MetricFrame(metrics=accuracy_score, y_true=y, y_pred=pred, sensitive_features=feature)
        assert cb.last[f"val/worst_group_acc/{name}"] == pytest.approx(frame.group_min()), name
        assert cb.last[f"val/acc_gap/{name}"] == pytest.approx(frame.difference()), name
        eo = equalized_odds_difference(y, pred, sensitive_features=feature)
        assert cb.last[f"val/equalized_odds_diff/{name}"] == pytest.approx(eo), name
        dpd = demographic_parity_difference(y, pred, sensitive_features=feature)
        assert cb.last[f"val/demographic_parity_diff/{name}"] == pytest.approx(dpd), name
        assert cb.last[f"val/missing_groups/{name}"] == 0
    # the primary attribute keeps its plain names; the per-attribute ones differ where the data differ
    assert cb.last["val/worst_group_acc"] == cb.last["val/worst_group_acc/sex"]
    assert cb.last["val/acc_gap"] == cb.last["val/acc_gap/sex"]
    assert "val/acc/age=old" in cb.last and "val/acc/sex&age=female&old" in cb.last
    assert not any(k.endswith("/group") for k in cb.last)


def test_one_attribute_logs_only_the_plain_summary_names(tmp_path):
    cb = SubgroupMetrics()
    t = trainer(tmp_path, [cb], limit_val_batches=None)
    t.validate(tiny_task(), datamodule=TinyData())
    summaries = [k for k in cb.last if k.startswith("val/acc_gap")]
    assert summaries == ["val/acc_gap"]


class FakeGradients(L.Callback):
    """Implements PerExampleGradients without any DP: norm of example i in a batch is i."""

    def __init__(self) -> None:
        self.batch_size = 0
        self.groups: list[np.ndarray] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch_size = len(batch[1])
        self.groups.append(batch[2].numpy())

    def per_sample_grad_norms(self) -> torch.Tensor | None:
        return torch.arange(self.batch_size, dtype=torch.float32)

    @property
    def clip_bound(self) -> float:
        return 4.5


def test_diagnostics_read_any_callback_implementing_the_protocol(tmp_path):
    fake = FakeGradients()
    assert isinstance(fake, PerExampleGradients)
    cb = SubgroupMetrics()
    t = trainer(tmp_path, [fake, cb], max_epochs=1)  # no DifferentialPrivacy callback at all
    t.fit(tiny_task(), datamodule=TinyData(n=200, batch_size=20))
    groups = np.concatenate(fake.groups)
    norms = np.concatenate([np.arange(len(g)) for g in fake.groups])
    for i, name in enumerate(["majority", "minority"]):
        m = groups == i
        assert cb.last[f"diag/grad_norm/group={name}"] == pytest.approx(norms[m].mean())
        assert cb.last[f"diag/frac_clipped/group={name}"] == pytest.approx((norms[m] > 4.5).mean())
        assert f"diag/loss/group={name}" in cb.last


def test_the_dp_callback_implements_the_protocol_and_is_found():
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=0.7)
    assert isinstance(dp, PerExampleGradients) and dp.clip_bound == 0.7
    assert find_per_example_gradients([L.Callback(), dp]) is dp
    assert find_per_example_gradients([L.Callback()]) is None
