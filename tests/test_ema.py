"""EMAWeights: the average matches a plain loop, evaluation and checkpoints use it, resume is exact."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from dp_helpers import TinyData, tiny_task, trainer
from torch.utils.data import DataLoader

from dplit.callbacks import EMAWeights
from dplit.data.base import GroupedTensorDataset


class OrderedData(TinyData):
    """TinyData without shuffling, so that a resumed run sees the batches of an uninterrupted one."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GroupedTensorDataset(self.x, self.y, self.group), batch_size=self.batch_size)


class Recorder(L.Callback):
    """The trainable weights after every optimizer step (read independently of EMAWeights)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, np.ndarray]] = []
        self.last = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.last:
            self.last = trainer.global_step
            self.steps.append({n: p.detach().numpy().copy() for n, p in pl_module.named_parameters()})


def test_average_matches_a_plain_loop_once_per_optimizer_step(tmp_path):
    ema, rec = EMAWeights(decay=0.9), Recorder()
    task = tiny_task()
    start = {n: p.detach().numpy().copy() for n, p in task.named_parameters()}
    trainer(tmp_path, [ema, rec], max_epochs=1, accumulate_grad_batches=2).fit(task, OrderedData(n=120, batch_size=20))
    assert len(rec.steps) == ema.updates == 3  # 6 batches, 2 per optimizer step
    for name, value in start.items():
        expected = value
        for t, weights in enumerate(rec.steps):
            d = min(0.9, (1 + t) / (10 + t))
            expected = d * expected + (1 - d) * weights[name]
        np.testing.assert_allclose(ema.ema[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        assert not np.allclose(expected, rec.steps[-1][name])  # the average is not the last iterate


def test_evaluation_and_checkpoints_use_the_average_and_resume_is_exact(tmp_path):
    data = OrderedData(n=40, batch_size=20)  # 2 optimizer steps an epoch

    def run(epochs: int, ckpt: str | None = None):
        ema = EMAWeights(decay=0.5, warmup=False)
        task = tiny_task()
        t = trainer(tmp_path, [ema], max_epochs=epochs, limit_val_batches=1.0)
        t.fit(task, data, ckpt_path=ckpt)
        return t, task, ema

    t1, task1, ema1 = run(1)
    raw = {n: p.detach().clone() for n, p in task1.named_parameters()}
    with torch.no_grad():  # validation ran with the EMA weights: recompute its loss with them
        for n, p in task1.named_parameters():
            p.copy_(ema1.ema[n])
        expected = task1.per_example_loss(task1(data.x), data.y).mean()
        for n, p in task1.named_parameters():
            p.copy_(raw[n])
    assert torch.isclose(t1.callback_metrics["val/loss"], expected, atol=1e-6)
    path = tmp_path / "one.ckpt"
    t1.save_checkpoint(path)
    saved = torch.load(path, weights_only=True)
    for n, value in ema1.ema.items():
        assert torch.equal(saved["state_dict"][n], value) and not torch.equal(value, raw[n])

    _, task2, ema2 = run(2, ckpt=str(path))  # resumed: training weights from the callback state
    _, task3, ema3 = run(2)  # uninterrupted
    assert ema2.updates == ema3.updates == 4
    for n, p in task3.named_parameters():
        assert torch.allclose(dict(task2.named_parameters())[n], p, atol=1e-6)
        assert torch.allclose(ema2.ema[n], ema3.ema[n], atol=1e-6)


def test_bad_decay_is_refused():
    with pytest.raises(ValueError, match="decay"):
        EMAWeights(decay=1.0)


def test_one_update_per_logical_step_under_dp_virtual_steps(tmp_path):
    from dplit.callbacks import DifferentialPrivacy

    ema = EMAWeights()
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, max_physical_batch_size=8)
    trainer(tmp_path, [dp, ema], max_epochs=1).fit(tiny_task(), TinyData(n=120, batch_size=40))
    assert dp.accountant.steps > 0 and ema.updates == dp.accountant.steps
