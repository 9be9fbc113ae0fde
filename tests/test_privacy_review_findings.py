"""Regression tests for the review findings (core v2): each measures the guarantee against an independent reference
(dp-accounting, counting each example's participations, the update itself), never against dplit's own helpers."""

from __future__ import annotations

import json
import math
from functools import partial

import dp_accounting
import lightning as L
import pytest
import torch
from dp_helpers import TinyData, tiny_task, trainer
from lightning.pytorch.callbacks import GradientAccumulationScheduler, ModelCheckpoint
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dplit.callbacks import DifferentialPrivacy
from dplit.privacy import engine
from dplit.privacy.backends import GhostLossError
from dplit.privacy.config import PrivacyConfigError
from dplit.tasks import ClassificationTask

DELTA = 1e-3


def gaussians_epsilon(sigma: float, count: int, delta: float = DELTA) -> float:
    """dp-accounting: ``count`` Gaussian mechanisms without subsampling."""
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(sigma), count)
    return acc.get_epsilon(delta)


def poisson_epsilon(q: float, sigma: float, steps: int, delta: float = DELTA) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


class Counting(Dataset):
    """Wraps a dataset and counts how often each example is read for training (its participations)."""

    def __init__(self, base: Dataset, n: int) -> None:
        self.base, self.counts, self.reads = base, torch.zeros(n, dtype=torch.long), []

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i: int):
        self.counts[i] += 1
        self.reads.append(i)
        return self.base[i]


class CountingData(TinyData):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        base = super().train_dataloader().dataset
        self.train_set = Counting(base, len(base))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)


class RecordDraws:
    """Stands in for the private loader's logical batch sampler and records the size of every draw."""

    def __init__(self, inner, sink: list) -> None:
        self.inner, self.sink = inner, sink

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        for batch in self.inner:
            self.sink[-1].append(len(batch)) if self.sink and isinstance(self.sink[-1], list) else self.sink.append(
                len(batch)
            )
            yield batch


def record_draws(dp: DifferentialPrivacy, sink: list) -> None:
    tracked = dp.loader.batch_sampler
    if not isinstance(tracked.logical, RecordDraws):
        tracked.logical = RecordDraws(tracked.logical, sink)


# ------------------------------------------------------------------------ 2: gradient accumulation by any route


def test_gradient_accumulation_scheduler_is_refused(tmp_path):
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0), GradientAccumulationScheduler({0: 4})])
    with pytest.raises(PrivacyConfigError, match="GradientAccumulationScheduler"):
        t.fit(tiny_task(), datamodule=TinyData())


def test_accumulation_set_after_setup_is_refused_before_any_step(tmp_path):
    class SneakyAccumulation(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            trainer.accumulate_grad_batches = 4

    dp = DifferentialPrivacy(noise_multiplier=1.0)
    t = trainer(tmp_path, [SneakyAccumulation(), dp])
    with pytest.raises(PrivacyConfigError, match="accumulate_grad_batches=4"):
        t.fit(tiny_task(), datamodule=TinyData())
    assert dp.accountant.steps == 0


@pytest.mark.parametrize("phys", [None, 4])
def test_every_poisson_draw_is_one_accounted_noised_step(tmp_path, monkeypatch, phys):
    """Counting independently: the logical batches the sampler drew == the releases == the accountant's steps."""
    draws: list[int] = []

    class Recording(UniformWithReplacementSampler):
        def __iter__(self):
            for batch in super().__iter__():
                draws.append(len(batch))
                yield batch

    monkeypatch.setattr(engine, "UniformWithReplacementSampler", Recording)
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=DELTA, max_physical_batch_size=phys)
    trainer(tmp_path, [dp], max_epochs=2).fit(tiny_task(), datamodule=TinyData())
    assert len(draws) == 20 == dp.accountant.steps
    assert dp.epsilon == pytest.approx(poisson_epsilon(0.1, 1.0, 20), rel=1e-3)


def test_max_steps_under_virtual_steps_counts_logical_steps(tmp_path):
    """Lightning counts every physical batch as an optimizer step; under virtual steps `max_steps` means logical
    (noised, accounted) steps, as the target_epsilon calibration assumes: exactly 30 releases, epsilon = target."""
    dp = DifferentialPrivacy(target_epsilon=2.0, delta=DELTA, max_physical_batch_size=12)
    t = trainer(tmp_path, [dp], max_epochs=-1, max_steps=30)
    t.fit(tiny_task(), datamodule=TinyData())
    assert dp.accountant.steps == 30
    assert t.global_step > 30  # B=20 expected, 12 a physical batch: most logical batches were split
    assert t.max_steps == 30  # the user's setting is back after the fit
    assert dp.stop_reason is None  # the planned end, not a budget stop
    assert dp.epsilon == pytest.approx(poisson_epsilon(0.1, dp.noise_multiplier, 30), rel=1e-3)
    assert dp.epsilon == pytest.approx(2.0, rel=0.02)


def test_max_steps_under_virtual_steps_resume_and_second_fit(tmp_path):
    """Resumed from a checkpoint, max_steps counts from the run's start (as the accountant does); a second fit of a
    fresh trainer with the same callback counts from 0, as Lightning does."""
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=DELTA, max_physical_batch_size=12)
    first = trainer(tmp_path, [dp], max_epochs=-1, max_steps=10)
    task = tiny_task()
    first.fit(task, datamodule=TinyData())
    first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = DifferentialPrivacy(noise_multiplier=1.0, delta=DELTA, max_physical_batch_size=12)
    trainer(tmp_path, [resumed], max_epochs=-1, max_steps=25).fit(
        tiny_task(), TinyData(), ckpt_path=tmp_path / "mid.ckpt"
    )
    assert dp.accountant.steps == 10 and resumed.accountant.steps == 25
    trainer(tmp_path, [dp], max_epochs=-1, max_steps=5).fit(task, datamodule=TinyData())
    assert dp.accountant.steps == 15  # the accountant continues (never resets); 5 more logical steps


# ------------------------------------------------------------------------ 3: non-Poisson passes


@pytest.mark.parametrize("limit", [0.2, 1.0])
def test_non_poisson_counts_every_reshuffled_pass(tmp_path, limit):
    data = CountingData()
    dp = DifferentialPrivacy(noise_multiplier=2.0, delta=DELTA, poisson_sampling=False)
    t = trainer(tmp_path, [dp], max_epochs=5, limit_train_batches=limit)
    t.fit(tiny_task(), datamodule=data)
    most = int(data.train_set.counts.max())  # participations of the most used example
    assert most >= 2  # with limit 0.2 some example is drawn in several of the 5 reshuffled passes
    assert dp.epsilon >= gaussians_epsilon(2.0, most) - 1e-9
    assert dp.epsilon == pytest.approx(gaussians_epsilon(2.0, 5), rel=1e-3)  # one Gaussian per pass started


def test_overfit_batches_is_refused(tmp_path):
    t = trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], overfit_batches=2)
    with pytest.raises(PrivacyConfigError, match="overfit_batches"):
        t.fit(tiny_task(), datamodule=TinyData())


def test_non_poisson_mid_epoch_resume_counts_the_new_pass(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    dp = DifferentialPrivacy(noise_multiplier=2.0, delta=DELTA, poisson_sampling=False)
    t = trainer(tmp_path, [dp, ckpt], max_steps=4, enable_checkpointing=True)
    t.fit(tiny_task(), datamodule=CountingData())
    mid = next((tmp_path / "ckpt").glob("*step=4*.ckpt"))
    data = CountingData()
    resumed = DifferentialPrivacy(noise_multiplier=2.0, delta=DELTA, poisson_sampling=False)
    trainer(tmp_path, [resumed], max_epochs=1).fit(tiny_task(), datamodule=data, ckpt_path=mid)
    assert resumed.accountant.steps == 10
    # the resumed epoch reshuffled: an example read before the checkpoint may be read again -> 2 Gaussians
    assert resumed.epsilon == pytest.approx(gaussians_epsilon(2.0, 2), rel=1e-3)


# ------------------------------------------------------------------------ 4: secret randomness


def _one_step_update(tmp_path, **dp_kwargs) -> tuple[torch.Tensor, dict]:
    L.seed_everything(0)
    task = tiny_task()
    before = nn.utils.parameters_to_vector(task.parameters()).detach().clone()
    dp = DifferentialPrivacy(noise_multiplier=1.0, **dp_kwargs)
    trainer(tmp_path, [dp], max_steps=1).fit(task, datamodule=TinyData())
    return nn.utils.parameters_to_vector(task.parameters()).detach() - before, dp.state_dict()


def test_noise_and_sampling_are_not_derivable_from_the_published_seed(tmp_path):
    a, state = _one_step_update(tmp_path)
    b, _ = _one_step_update(tmp_path)
    assert not torch.allclose(a, b)  # same seed_everything, same config: different noise and draws
    assert not any("rng" in key for key in state) and state["insecure_testing_seed"] is False
    c, state = _one_step_update(tmp_path, insecure_testing_seed=3)
    d, _ = _one_step_update(tmp_path, insecure_testing_seed=3)
    torch.testing.assert_close(c, d)  # only the loudly named switch reproduces them, and it is recorded
    assert state["insecure_testing_seed"] is True


def test_testing_seed_warns_loudly(tmp_path):
    with pytest.warns(UserWarning, match="does NOT hold"):
        _one_step_update(tmp_path, insecure_testing_seed=1)


def test_a_resumed_run_draws_fresh_batches(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0), ckpt], enable_checkpointing=True).fit(
        tiny_task(), datamodule=TinyData()
    )
    draws = []
    for _ in range(2):
        data = CountingData()
        trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], max_epochs=2).fit(
            tiny_task(), datamodule=data, ckpt_path=tmp_path / "ckpt" / "last.ckpt"
        )
        draws.append(list(data.train_set.reads))
    assert draws[0] != draws[1]


# ------------------------------------------------------------------------ 5: ghost clipping and extra loss terms


class PenalisedTask(ClassificationTask):
    def __init__(self, penalty: str) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2)), partial(torch.optim.SGD, lr=0.1))
        self.penalty = penalty

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        if self.penalty == "l2":
            loss = loss + 0.1 * sum(p.pow(2).sum() for p in self.parameters())
        elif self.penalty == "logit_mean":
            loss = loss + logits.mean() ** 2
        elif self.penalty == "plain_tensor":
            loss = nn.functional.cross_entropy(logits, y)
        return {"loss": loss}


@pytest.mark.parametrize("penalty", ["l2", "logit_mean", "plain_tensor"])
def test_ghost_refuses_any_loss_but_the_criterion(tmp_path, penalty):
    dp = DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost")
    with pytest.raises(GhostLossError, match="exactly `self.criterion"):
        trainer(tmp_path, [dp], max_steps=1).fit(PenalisedTask(penalty), datamodule=TinyData())
    assert dp.accountant.steps == 0


def test_ghost_keeps_the_criterion_in_the_state_dict(tmp_path):
    task = tiny_task()
    task.criterion = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 3.0]))
    trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0, grad_sample_mode="ghost")], max_steps=2).fit(
        task, datamodule=TinyData()
    )
    assert torch.equal(task.state_dict()["criterion.weight"], torch.tensor([1.0, 3.0]))


# ------------------------------------------------------------------------ 6: the budget beats min_epochs / min_steps


def test_min_epochs_beyond_the_budget_is_refused(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_epsilon=2.0, delta=DELTA)
    with pytest.raises(PrivacyConfigError, match="min_epochs"):
        trainer(tmp_path, [dp], max_epochs=50, min_epochs=40).fit(tiny_task(), datamodule=TinyData())


def test_budget_holds_when_something_forces_training_on(tmp_path):
    """Lightning ignores `should_stop` below min_epochs; the optimizer then refuses every step past the budget."""

    class ForceMinEpochs(L.Callback):
        def on_train_start(self, trainer, pl_module):
            trainer.fit_loop.min_epochs = 6

    dp = DifferentialPrivacy(noise_multiplier=1.0, max_epsilon=2.0, delta=DELTA)
    task = tiny_task()
    t = trainer(tmp_path, [dp, ForceMinEpochs()], max_epochs=6, val_check_interval=0.5, limit_val_batches=1)
    t.fit(task, datamodule=TinyData())
    limit = max(n for n in range(1, 200) if poisson_epsilon(0.1, 1.0, n) <= 2.0)
    assert dp.accountant.steps == limit and dp.epsilon <= 2.0
    assert poisson_epsilon(0.1, 1.0, limit) <= 2.0 < poisson_epsilon(0.1, 1.0, limit + 1)
    assert t.current_epoch == 6 and dp.stop_reason is not None and "budget" in dp.stop_reason


# ------------------------------------------------------------------------ 7: virtual steps cut by the epoch end


class ConstantGradient(L.LightningModule):
    """One bias; every example's gradient is the same huge number, so each is clipped to exactly C: the update of a
    released step is C * (examples in it) / B with SGD lr 1."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 1)
        self.head.weight.requires_grad_(False)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.criterion = nn.MSELoss()

    def training_step(self, batch, batch_idx):
        x, _, _ = batch
        out = self.head(torch.zeros(len(x), 1)).squeeze(-1)
        return {"loss": self.criterion(out, torch.full_like(out, 1e6))}

    def configure_optimizers(self):
        return torch.optim.SGD([self.head.bias], lr=1.0)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_a_logical_batch_cut_by_the_epoch_end_never_leaks(tmp_path, mode):
    """5 physical batches an epoch of at most 8 rows: logical batches (~20 rows, 3 physical) are cut at epoch ends.
    Counting rows independently: each release holds exactly one complete Poisson draw, never a cut one's rows."""
    released: list[int] = []
    draws: list[list[int]] = []
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=1.0, max_physical_batch_size=8, grad_sample_mode=mode)

    class Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            draws.append([])
            record_draws(dp, draws)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = float(pl_module.head.bias)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            delta = float(pl_module.head.bias) - self.before
            if delta != 0:  # a release (noise 1e-9 makes even an empty draw's update nonzero)
                released.append(round(delta * 20 / 1.0))  # rows in it: update = C * rows / B, B = 20, C = 1

    trainer(tmp_path, [dp, Watch()], max_epochs=4, limit_train_batches=5).fit(ConstantGradient(), datamodule=TinyData())
    expected = []
    for epoch in draws:
        budget = 5  # physical batches Lightning runs this epoch
        for rows in epoch:
            need = max(1, math.ceil(rows / 8))
            if need > budget:
                break  # cut by the epoch end: never released
            budget -= need
            expected.append(rows)
    assert released == expected and len(expected) >= 4
    assert dp.accountant.steps == len(expected)


# ------------------------------------------------------------------------ 8: fitting again continues the accountant


def test_fitting_again_continues_the_accountant(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=DELTA)
    task, data, seen = tiny_task(), TinyData(), []
    for k in (1, 2, 3):
        trainer(tmp_path, [dp], max_steps=10 * k).fit(task, datamodule=data)
        seen.append(dp.epsilon)
    assert dp.accountant.steps == 30
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert dp.epsilon == pytest.approx(poisson_epsilon(0.1, 1.0, 30), rel=1e-3)


def test_two_runs_in_one_log_dir_keep_their_own_ledgers(tmp_path):
    for _ in range(2):
        trainer(tmp_path, [DifferentialPrivacy(noise_multiplier=1.0)], max_steps=3).fit(
            tiny_task(), datamodule=TinyData()
        )
    ledgers = [json.loads(f.read_text()) for f in tmp_path.glob("privacy_ledger-*.json")]
    assert len(ledgers) == 2 and ledgers[0]["run_id"] != ledgers[1]["run_id"]
    assert all(sum(n for *_, n in ledger["accountant"]["history"]) == 3 for ledger in ledgers)
