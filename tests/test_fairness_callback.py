"""SubgroupMetrics in a real Lightning run: values vs a numpy loop, missing groups, diagnostics, W&B offline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dp_helpers import TinyData, tiny_task, trainer
from test_privacy_callback import Probe, per_example_grads
from torch.utils.data import DataLoader

from dplit.callbacks import DifferentialPrivacy, SubgroupMetrics
from dplit.data.base import GroupedTensorDataset
from dplit.loggers import AutoWandbLogger


def reference(task, data: TinyData, names: list[str]) -> dict[str, float]:
    """Plain numpy per-group accuracy/loss/TPR over the validation set."""
    with torch.no_grad():
        logits = task(data.x)
    loss = torch.nn.functional.cross_entropy(logits, data.y, reduction="none").numpy()
    pred, y, g = logits.argmax(-1).numpy(), data.y.numpy(), data.group.numpy()
    out = {}
    for i, name in enumerate(names):
        m = g == i
        if m.sum() == 0:
            continue
        out[f"val/acc/group={name}"] = float((pred[m] == y[m]).mean())
        out[f"val/loss/group={name}"] = float(loss[m].mean())
        out[f"val/count/group={name}"] = float(m.sum())
        pos = m & (y == 1)
        out[f"val/tpr/group={name}"] = float((pred[pos] == 1).mean())
    accs = [v for k, v in out.items() if k.startswith("val/acc/")]
    out["val/acc_gap"], out["val/worst_group_acc"] = max(accs) - min(accs), min(accs)
    return out


def test_group_metrics_match_a_numpy_loop(tmp_path):
    data, task, cb = TinyData(n=300), tiny_task(), SubgroupMetrics()
    t = trainer(tmp_path, [cb], max_epochs=2, limit_val_batches=None)
    t.fit(task, datamodule=data)
    ref = reference(task, data, data.group_names)
    for key, value in ref.items():
        assert t.callback_metrics[key].item() == pytest.approx(value, abs=1e-5), key
    assert "val/auc/group=minority" in t.callback_metrics and "val/equalized_odds_diff" in t.callback_metrics


class ThreeGroups(TinyData):
    """Names a third group that never occurs in the data."""

    def __init__(self) -> None:
        super().__init__()
        self.group_names = ["majority", "minority", "absent"]


def test_empty_group_is_missing_not_zero(tmp_path):
    t = trainer(tmp_path, [SubgroupMetrics()], max_epochs=1, limit_val_batches=None)
    t.fit(tiny_task(), datamodule=ThreeGroups())
    assert "val/acc/group=absent" not in t.callback_metrics
    assert t.callback_metrics["val/missing_groups"].item() == 1
    assert "val/acc/group=minority" in t.callback_metrics


class TwoAttributes(TinyData):
    def __init__(self) -> None:
        super().__init__()
        self.second = torch.arange(len(self.y)) % 3
        self.group_attributes = {"size": ["majority", "minority"], "third": ["t0", "t1", "t2"]}

    def val_dataloader(self) -> DataLoader:
        groups = torch.stack([self.group, self.second], dim=1)  # [N, 2]
        return DataLoader(GroupedTensorDataset(self.x, self.y, groups), batch_size=64)


def test_other_attributes_and_intersections(tmp_path):
    data, task = TwoAttributes(), tiny_task()
    t = trainer(tmp_path, [SubgroupMetrics(intersections=True)], max_epochs=1, limit_val_batches=None)
    t.fit(task, datamodule=data)
    with torch.no_grad():
        pred = task(data.x).argmax(-1)
    for a, name_a in enumerate(["majority", "minority"]):
        for b in range(3):
            m = (data.group == a) & (data.second == b)
            key = f"val/acc/size&third={name_a}&t{b}"
            assert t.callback_metrics[key].item() == pytest.approx((pred[m] == data.y[m]).float().mean().item())
    m = data.second == 1
    assert t.callback_metrics["val/acc/third=t1"].item() == pytest.approx((pred[m] == data.y[m]).float().mean().item())


def test_train_diagnostics_are_right_and_change_nothing(tmp_path):
    c = 0.5
    params = {}
    for name, extra in (("plain", []), ("diag", [SubgroupMetrics(train_diagnostics=True)])):
        probe = Probe()
        dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=c, insecure_testing_seed=4)
        task = tiny_task()
        t = trainer(tmp_path, [dp, *extra, probe], max_epochs=1, limit_train_batches=1)
        t.fit(task, datamodule=TinyData())
        params[name] = torch.nn.utils.parameters_to_vector(task.parameters()).detach()
        if name == "diag":
            step = probe.steps[0]
            norms = per_example_grads(task, step["before"], step["batch"]).norm(dim=1).numpy()
            groups = step["batch"][2].numpy()
            for i, g in enumerate(["majority", "minority"]):
                if (groups == i).any():
                    got = t.callback_metrics[f"diag/grad_norm/group={g}"].item()
                    assert got == pytest.approx(norms[groups == i].mean(), rel=1e-4)
                    frac = t.callback_metrics[f"diag/frac_clipped/group={g}"].item()
                    assert frac == pytest.approx((norms[groups == i] > c).mean())
                    assert f"diag/loss/group={g}" in t.callback_metrics
    torch.testing.assert_close(params["plain"], params["diag"], rtol=0, atol=0)


def test_no_diagnostics_without_dp_or_when_off(tmp_path):
    t = trainer(tmp_path, [SubgroupMetrics()], max_epochs=1)
    t.fit(tiny_task(), datamodule=TinyData())
    assert not any(k.startswith("diag/") for k in t.callback_metrics)
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    t = trainer(tmp_path, [dp, SubgroupMetrics(train_diagnostics=False)], max_epochs=1)
    t.fit(tiny_task(), datamodule=TinyData())
    assert not any(k.startswith("diag/") for k in t.callback_metrics)


def test_wandb_offline_run_holds_the_group_series(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = AutoWandbLogger(save_dir=str(tmp_path), project="dplit-test", name="groups")
    assert logger.resolved_mode == "offline"
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    t = trainer(tmp_path, [dp, SubgroupMetrics()], max_epochs=2, logger=logger, limit_val_batches=None)
    t.fit(tiny_task(), datamodule=TinyData())
    logger.experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
    for key in (b"val/acc/group=minority", b"val/acc_by_group", b"val/groups", b"privacy/epsilon", b"diag/"):
        assert key in blob, key
    assert np.isfinite(dp.epsilon)


def test_task_without_group_outputs_is_a_clear_error(tmp_path):
    class Bare(type(tiny_task())):
        def validation_step(self, batch, batch_idx):
            return None

    task = Bare(tiny_task().backbone)
    t = trainer(tmp_path, [SubgroupMetrics()], max_epochs=1, limit_val_batches=1)
    with pytest.raises(ValueError, match="must return a dict with `preds`, `y`, `group`"):
        t.fit(task, datamodule=TinyData())


@pytest.mark.ddp
def test_ddp_group_metrics_equal_single_process(tmp_path):
    """2 CPU processes (gloo): each example evaluated once (odd N, no padding duplicates), metrics synced."""
    import json

    from dp_helpers import run_ddp_job

    n = 301
    out = tmp_path / "ddp.json"
    run_ddp_job("ddp_group_metrics_job.py", [str(out), str(n)], tmp_path)
    ddp = json.loads(out.read_text())
    cb = SubgroupMetrics()
    t = trainer(tmp_path, [cb], limit_val_batches=None)
    t.validate(tiny_task(), datamodule=TinyData(n=n))
    assert ddp["val/count/group=majority"] + ddp["val/count/group=minority"] == n
    assert ddp.keys() == cb.last.keys()
    for key, value in cb.last.items():
        assert ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
