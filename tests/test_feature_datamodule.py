"""``FeatureDataModule`` (cached features as grouped batches) and ``scripts/mnist_pretrained_head.py`` on a tiny
real-format MNIST: features cached in chunks (a rerun reads them, not the trunk), a DP head at the configured noise
with the RDP epsilon of dp-accounting, the results table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
import torch

from dplit.data.features import FeatureDataModule

ROOT = Path(__file__).resolve().parents[1]


def _cache(n: int = 40, d: int = 6) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    return {s: {"pooled": torch.randn(n, d, generator=g), "y": y, "group": y} for s in ("train", "val", "test")}


def test_feature_datamodule_serves_the_cached_rows_with_groups():
    cache = _cache()
    dm = FeatureDataModule(cache, "pooled", {"class": ["a", "b", "c"]}, 3, batch_size=8)
    split = dm.splits()
    assert len(split["train"]) == 40 and dm.group_names == ["a", "b", "c"]
    x, y, group = split["test"][5]
    assert torch.equal(x, cache["test"]["pooled"][5]) and int(y) == int(group) == 5 % 3


def test_feature_datamodule_names_what_is_missing():
    with pytest.raises(ValueError, match="needs 'train', 'val' and 'test'"):
        FeatureDataModule({"test": _cache()["test"]}, "pooled", {"class": ["a"]}, 1, 8)
    broken = _cache()
    del broken["test"]["group"]
    with pytest.raises(ValueError, match=r"splits \['test'\] lack 'pooled', 'y' or 'group'"):
        FeatureDataModule(broken, "pooled", {"class": ["a"]}, 1, 8)


def _rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


def test_mnist_pretrained_head_script_end_to_end(mnist_root, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "mnist_pretrained_head.py"), "--root", str(mnist_root), "--out",
           str(out), "--keep", "20", "--epochs", "2", "--resolution", "32", "--batch-size", "64", "--methods", "nodp",
           "dpsgd", "--seeds", "0", "1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "features train: 560 / 560" in done.stdout  # 9 x 60 + 20 eights, in one chunk
    chunks = sorted((out / "features").glob("*/*.pt"))
    assert [c.name for c in chunks] == ["test_0000.pt", "train_0000.pt"]
    part = torch.load(chunks[1])
    assert part["pooled"].shape == (560, 1280) and int((part["y"] == 8).sum()) == 20
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["method"], r["seed"]) for r in rows) == [("dpsgd", 0), ("dpsgd", 1), ("nodp", 0), ("nodp", 1)]
    dp = [r for r in rows if r["method"] == "dpsgd"]
    # 2 epochs of Poisson batches with q = 64 / 560 -> round(560 / 64) = 9 steps per epoch (the DP callback's plan)
    steps = 2 * round(560 / 64)
    assert dp[0]["epsilon"] == pytest.approx(_rdp_epsilon(64 / 560, 0.8, steps, 1e-6), rel=1e-3)
    assert all(0.0 <= r["test/acc"] <= 1.0 and "test/acc/group=8" in r for r in rows)
    table = (out / "results.md").read_text()
    assert "| nodp | 2 (0, 1) | — |" in table and "| dpsgd | 2 (0, 1) |" in table and "200 MNIST test digits" in table

    # a rerun skips the finished cells and reads the cached features (the trunk does not run again)
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and "features train" not in again.stdout
    assert len((out / "results.jsonl").read_text().splitlines()) == 4
