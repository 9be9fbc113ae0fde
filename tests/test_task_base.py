"""GroupedTask: the per-example-loss contract, step outputs, optimizers and LR schedulers from YAML (also under DP)."""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from dp_helpers import TinyData, tiny_task, trainer
from opacus.optimizers import DPOptimizer
from torch import nn

from dplit.callbacks import DifferentialPrivacy
from dplit.cli import DplitCLI
from dplit.cli.errors import CLIUsageError
from dplit.tasks import ClassificationTask, GroupedTask


def _batch(n: int = 8, dim: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, dim, generator=g), torch.randint(0, 2, (n,), generator=g), torch.arange(n) % 2


def test_training_loss_is_exactly_the_criterion_output_and_called_once():
    task = tiny_task()
    seen = []
    task.criterion.register_forward_hook(lambda mod, args, out: seen.append(out))
    x, y, group = _batch()
    out = task.training_step((x, y, group), 0)
    assert len(seen) == 1 and out["loss"] is seen[0]  # nothing added, and per_example_loss fires no hook
    logits = task(x)
    torch.testing.assert_close(out["loss"], nn.functional.cross_entropy(logits, y))
    torch.testing.assert_close(out["example_loss"], nn.functional.cross_entropy(logits, y, reduction="none"))
    assert not out["example_loss"].requires_grad and task.criterion.reduction == "mean"


def test_eval_step_returns_per_example_outputs():
    task = tiny_task()
    x, y, group = _batch()
    out = task.validation_step((x, y, group), 0)
    logits = task(x)
    torch.testing.assert_close(out["probs"], logits.softmax(-1))
    assert torch.equal(out["preds"], logits.argmax(-1)) and torch.equal(out["y"], y) and out["group"] is group
    torch.testing.assert_close(out["loss"], nn.functional.cross_entropy(logits, y, reduction="none"))


class MultiLabel(GroupedTask):
    """A second task family on the same base: 3 independent labels, BCE per label."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 3))
        self.criterion = nn.BCEWithLogitsLoss()

    def predict(self, outputs):
        probs = outputs.sigmoid()
        return (probs > 0.5).long(), probs


def test_per_example_loss_averages_the_extra_dimensions_of_a_criterion():
    task = MultiLabel()
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5, 3)).float()
    out = task.training_step((x, y, torch.zeros(5, dtype=torch.long)), 0)
    bce = nn.functional.binary_cross_entropy_with_logits(task(x), y, reduction="none")  # [5, 3]
    torch.testing.assert_close(out["example_loss"], bce.mean(dim=1))
    torch.testing.assert_close(out["loss"], bce.mean())


def test_only_trainable_parameters_reach_the_optimizer_and_the_default_is_sgd_005():
    task = ClassificationTask(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2)))  # default optimizer
    task.backbone[0].weight.requires_grad_(False)
    opt = task.configure_optimizers()
    assert type(opt) is torch.optim.SGD and opt.param_groups[0]["lr"] == 0.05
    given = {id(p) for group in opt.param_groups for p in group["params"]}
    assert given == {id(p) for p in task.parameters() if p.requires_grad}
    assert id(task.backbone[0].weight) not in given


def test_a_non_callable_optimizer_says_how_to_write_it():
    with pytest.raises(ValueError, match=r"class_path: torch.optim.SGD.*lr/momentum"):
        ClassificationTask(nn.Linear(2, 2), optimizer="sgd")  # type: ignore[arg-type]


MODEL_YAML = """
model:
  class_path: dplit.tasks.ClassificationTask
  init_args:
    backbone: {class_path: torch.nn.Linear, init_args: {in_features: 20, out_features: 2}}
    optimizer:
      class_path: torch.optim.SGD
      init_args: {lr: 0.1, momentum: 0.9, weight_decay: 0.001}
    lr_scheduler:
      class_path: torch.optim.lr_scheduler.CosineAnnealingLR
      init_args: {T_max: 3}
"""


def test_optimizer_and_scheduler_from_yaml_work_under_dp(tmp_path):
    """Any torch.optim class from YAML; DP wraps it (SGD -> DP-SGD) and the epoch-wise cosine schedule still runs."""
    config = tmp_path / "model.yaml"
    config.write_text(MODEL_YAML)
    cli = DplitCLI(args=["--config", str(config)], run=False, trainer_defaults={"logger": False})
    task = cli.model
    lrs: list[float] = []

    class LR(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    dp = DifferentialPrivacy(noise_multiplier=1.0, ledger=False)
    t = trainer(tmp_path, [dp, LR()], max_epochs=3)
    t.fit(task, datamodule=TinyData())
    opt = t.optimizers[0]
    assert isinstance(opt, DPOptimizer) and type(opt.original_optimizer) is torch.optim.SGD
    group = opt.param_groups[0]
    assert group["momentum"] == 0.9 and group["weight_decay"] == 0.001
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])
    assert dp.accountant is not None and dp.accountant.steps == 30


def test_step_interval_scheduler_steps_every_optimizer_step(tmp_path):
    task = tiny_task(
        optimizer=partial(torch.optim.Adam, lr=0.01),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
        lr_scheduler_interval="step",
    )
    t = trainer(tmp_path, [], max_steps=4)
    t.fit(task, datamodule=TinyData())
    assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5**4)


def test_the_old_string_switch_is_refused_at_parse_time(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text(
        "model:\n  class_path: dplit.tasks.ClassificationTask\n  init_args:\n"
        "    backbone: {class_path: torch.nn.Linear, init_args: {in_features: 2, out_features: 2}}\n"
        "    optimizer: sgd\n"
    )
    with pytest.raises(CLIUsageError, match=r"`model.init_args.optimizer` .*must be a class, given as `\{class_path"):
        DplitCLI(args=["--config", str(config)], run=False)


def test_reduce_on_plateau_gets_the_monitored_metric():
    task = tiny_task(
        lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0), lr_scheduler_monitor="val/acc"
    )
    config = task.configure_optimizers()
    assert config["lr_scheduler"]["monitor"] == "val/acc" and config["lr_scheduler"]["interval"] == "epoch"
    plain = tiny_task(lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1))
    assert "monitor" not in plain.configure_optimizers()["lr_scheduler"]
