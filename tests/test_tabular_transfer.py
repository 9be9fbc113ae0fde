"""Transfer: a non-DP source-domain run's checkpoint initialises the target model before the DP callback wraps it;
head-only fine-tuning under DP leaves the body exactly as pretrained; bad checkpoints are clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.optimizers import DPOptimizer
from tabular_fixtures import write_credit

from dplit.callbacks import DifferentialPrivacy
from dplit.cli import DplitCLI
from dplit.models import TabularMLP

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--trainer.max_steps=3", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false"]  # fmt: skip


def test_init_from_loads_weights_and_head_only_freezes_the_body(tmp_path):
    source = TabularMLP(10, 2, [8, 4])
    ckpt = tmp_path / "task.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, ckpt)
    target = TabularMLP(10, 2, [8, 4], init_from=str(ckpt), finetune="head")
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert [n for n, p in target.named_parameters() if p.requires_grad] == ["head.weight", "head.bias"]
    assert all(p.requires_grad for p in TabularMLP(10, 2, [8, 4], init_from=str(ckpt)).parameters())
    with pytest.raises(ValueError, match="shape mismatches.*share the feature encoding"):
        TabularMLP(11, 2, [8, 4], init_from=str(ckpt))  # another input width: no silent partial load
    with pytest.raises(FileNotFoundError, match="Pretrain on the public source domain first"):
        TabularMLP(10, 2, init_from=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="needs init_from"):
        TabularMLP(10, 2, finetune="head")


def test_source_pretraining_then_dp_head_fine_tuning(tmp_path, monkeypatch):
    """credit_source_nodp.yaml then credit_transfer_dp.yaml (head only) on a real-format fixture: the target run
    starts from the source checkpoint, trains under a DP optimizer, and changes the head only."""
    monkeypatch.chdir(tmp_path)
    write_credit(tmp_path / "credit", n=700)
    data = [f"--data.init_args.root={tmp_path / 'credit'}"]
    source = DplitCLI(args=["fit", f"--config={ROOT / 'configs' / 'credit_source_nodp.yaml'}", *FAST, *data])
    assert not any(isinstance(cb, DifferentialPrivacy) for cb in source.trainer.callbacks)
    assert source.datamodule.domain == "source"
    ckpt = tmp_path / "runs" / "credit_source" / "checkpoint" / "source.ckpt"  # the path the target config names
    pretrained = {k[len("backbone.") :]: v for k, v in torch.load(ckpt)["state_dict"].items()}

    head = ["--model.init_args.backbone.init_args.finetune=head"]
    target = DplitCLI(args=["fit", f"--config={ROOT / 'configs' / 'credit_transfer_dp.yaml'}", *FAST, *data, *head])
    assert target.datamodule.domain == "target"
    assert isinstance(target.trainer.optimizers[0], DPOptimizer)
    dp = next(cb for cb in target.trainer.callbacks if isinstance(cb, DifferentialPrivacy))
    assert dp.accountant.steps == 3 and dp.epsilon > 0
    tuned = target.model.backbone.state_dict()
    for name, value in pretrained.items():
        same = torch.equal(value, tuned[name])
        assert same == (not name.startswith("head.")), name  # body frozen as pretrained, head trained
