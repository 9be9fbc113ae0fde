"""DP is really on: checked against per-example autograd, statistics and Google's dp-accounting, not our own code."""

from __future__ import annotations

import math
from functools import partial

import dp_accounting
import lightning as L
import pytest
import torch
from dp_helpers import TinyData, tiny_task, trainer
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from dplit.callbacks import DifferentialPrivacy


class Probe(L.Callback):
    """Records, for each step, the batch, parameters before/after and the per-sample grads Opacus formed."""

    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"batch": [t.clone() for t in batch], "before": self._flat(pl_module)})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps[-1]["optimizer"] = optimizer
        gs = [getattr(p, "grad_sample", None) for p in pl_module.parameters()]
        if all(g is not None for g in gs):
            self.steps[-1]["grad_sample"] = torch.cat([g.flatten(1) for g in gs], dim=1).clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["after"] = self._flat(pl_module)

    @staticmethod
    def _flat(module: nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def per_example_grads(task, flat_params: torch.Tensor, batch) -> torch.Tensor:
    """Independent reference: one autograd call per example on a fresh copy of the backbone. [B, P]."""
    model = tiny_task(hidden=task.backbone[0].out_features).backbone
    torch.nn.utils.vector_to_parameters(flat_params, model.parameters())
    x, y, _ = batch
    rows = []
    for i in range(len(y)):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def clipped_sum(grads: torch.Tensor, c: float) -> torch.Tensor:
    norms = grads.norm(dim=1, keepdim=True)
    return (grads * (c / (norms + 1e-6)).clamp(max=1.0)).sum(0)


def rdp_epsilon(q: float, sigma: float, steps: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def fit(tmp_path, dp: DifferentialPrivacy, probe: Probe | None = None, task=None, data=None, **trainer_kwargs):
    task = task or tiny_task()
    data = data or TinyData()
    t = trainer(tmp_path, [dp] + ([probe] if probe else []), **trainer_kwargs)
    t.fit(task, datamodule=data)
    return t, task


def test_optimizer_is_dp_and_per_sample_grads_match_autograd(tmp_path):
    probe, dp = Probe(), DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0)
    t, task = fit(tmp_path, dp, probe, max_steps=3)
    assert isinstance(t.optimizers[0], DPOptimizer)
    for step in probe.steps:
        assert isinstance(step["optimizer"], DPOptimizer)
        ref = per_example_grads(task, step["before"], step["batch"])
        torch.testing.assert_close(step["grad_sample"], ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost", "bookkeeping"])
def test_update_is_clipped_mean_of_per_example_grads(tmp_path, mode):
    """With negligible noise, the SGD update equals lr * sum_i clip_C(g_i) / B from per-example autograd."""
    c, lr = 0.05, 0.5  # small C so that every example is clipped
    probe = Probe()
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=c, grad_sample_mode=mode)
    t, task = fit(tmp_path, dp, probe, task=tiny_task(lr=lr), max_steps=3)
    b = dp.plan.batch_size
    assert len(probe.steps) == 3
    for step in probe.steps:
        grads = per_example_grads(task, step["before"], step["batch"])
        assert (grads.norm(dim=1) > c).all()
        expected = lr * clipped_sum(grads, c) / b
        torch.testing.assert_close(step["before"] - step["after"], expected, rtol=1e-3, atol=1e-7)
        # every example contributes a clipped gradient: the update (times B / lr) is at most |batch| * C
        assert ((step["before"] - step["after"]) * b / lr).norm() <= len(step["batch"][1]) * c * (1 + 1e-4)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_noise_std_is_sigma_c_over_b_and_added_once(tmp_path, mode):
    """Lightning passes a closure to optimizer.step (Opacus #313): the noise must still be there, exactly once."""
    sigma, c, lr = 2.0, 1.0, 1.0
    probe = Probe()
    dp = DifferentialPrivacy(noise_multiplier=sigma, max_grad_norm=c, grad_sample_mode=mode, insecure_testing_seed=3)
    t, task = fit(tmp_path, dp, probe, task=tiny_task(lr=lr, hidden=256), max_steps=2)
    b = dp.plan.batch_size
    assert len(probe.steps) == 2
    for step in probe.steps:
        grads = per_example_grads(task, step["before"], step["batch"])
        noise = (step["before"] - step["after"]) / lr - clipped_sum(grads, c) / b  # [P] ~ N(0, (sigma C / B)^2)
        p = noise.numel()
        expected = sigma * c / b
        assert p > 5000
        assert abs(noise.std().item() / expected - 1) < 0.05  # 5 s.e. of the std estimate; sqrt(2) if added twice
        assert abs(noise.mean().item()) < 5 * expected / math.sqrt(p)


def test_huge_noise_destroys_accuracy(tmp_path):
    def accuracy(callbacks):
        task, data = tiny_task(lr=0.5), TinyData(n=400)
        t = trainer(tmp_path, callbacks, max_epochs=8)
        t.fit(task, datamodule=data)
        with torch.no_grad():
            return (task(data.x).argmax(-1) == data.y).float().mean().item()

    clean = accuracy([])
    noisy = accuracy([DifferentialPrivacy(noise_multiplier=1e4, max_grad_norm=1.0)])
    assert clean > 0.9
    assert noisy < 0.75


def test_loader_is_poisson_with_the_accountant_sample_rate(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0)
    t, _ = fit(tmp_path, dp, max_steps=2)
    sampler = dp.loader.batch_sampler.logical
    assert isinstance(sampler, UniformWithReplacementSampler)
    q = 20 / 200
    assert sampler.sample_rate == pytest.approx(q) == dp.plan.sample_rate
    history = dp.accountant.state_dict()["history"]
    assert sum(n for *_, n in history) == 2 and all(entry[1] == pytest.approx(q) for entry in history)
    sizes = torch.tensor([len(b) for _ in range(300) for b in sampler], dtype=torch.float)
    n = 300 * sampler.steps
    assert abs(sizes.mean().item() - 200 * q) < 4 * math.sqrt(200 * q * (1 - q) / n)
    assert sizes.var().item() == pytest.approx(200 * q * (1 - q), rel=0.1)  # binomial, not fixed-size


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_empty_batches_are_noised_steps(tmp_path, mode):
    probe = Probe()
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_epsilon=1e6, grad_sample_mode=mode)
    fit(tmp_path, dp, probe, data=TinyData(n=200, batch_size=1), max_steps=40)
    sizes = [len(s["batch"][1]) for s in probe.steps]
    assert 0 in sizes
    assert dp.accountant.steps == 40
    empty = next(s for s in probe.steps if len(s["batch"][1]) == 0)
    assert not torch.equal(empty["before"], empty["after"])  # noise only, but an update all the same


def test_epsilon_matches_dp_accounting_and_grows(tmp_path):
    eps = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            eps.append(trainer.callback_metrics["privacy/epsilon"].item())

    dp = DifferentialPrivacy(noise_multiplier=1.1, delta=1e-3)
    t = trainer(tmp_path, [dp, Watch()], max_epochs=2, log_every_n_steps=1)
    t.fit(tiny_task(), datamodule=TinyData())
    assert all(b > a for a, b in zip(eps, eps[1:]))
    assert dp.accountant.steps == 20
    assert eps[-1] == pytest.approx(rdp_epsilon(0.1, 1.1, 20, 1e-3), rel=0.01)


def test_budget_stops_before_exceeding_and_writes_checkpoint(tmp_path):
    budget = rdp_epsilon(0.1, 1.0, 7, 1e-3) * 1.0001  # 7 steps fit in the budget, the 8th would not
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3, max_epsilon=budget)
    t = trainer(tmp_path, [dp], max_epochs=5, enable_checkpointing=True)
    t.fit(tiny_task(), datamodule=TinyData())
    assert dp.accountant.steps == 7
    assert dp.epsilon <= budget
    ckpts = list(tmp_path.rglob("*.ckpt"))
    assert ckpts, "a checkpoint must be written when the budget stops training"
    state = torch.load(ckpts[0], weights_only=True)
    saved = next(v for k, v in state["callbacks"].items() if k.startswith("DifferentialPrivacy"))
    assert saved["accountant"]["history"][-1][2] == 7


def test_target_epsilon_is_reached_within_one_percent(tmp_path):
    dp = DifferentialPrivacy(target_epsilon=2.0, delta=1e-3)
    t = trainer(tmp_path, [dp], max_epochs=3)
    t.fit(tiny_task(), datamodule=TinyData())
    assert dp.accountant.steps == 30
    assert 2.0 * 0.99 <= rdp_epsilon(0.1, dp.noise_multiplier, 30, 1e-3) <= 2.0 * 1.0001


def test_per_layer_clipping_bounds_each_layer(tmp_path):
    """per_layer: each parameter tensor's per-sample grad is clipped to C/sqrt(k), so the total stays <= C."""
    c, lr = 0.05, 0.5
    probe = Probe()
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=c, clipping="per_layer")
    t, task = fit(tmp_path, dp, probe, task=tiny_task(lr=lr), max_steps=2)
    shapes = [p.numel() for p in task.parameters()]
    c_layer = c / math.sqrt(len(shapes))
    for step in probe.steps:
        grads = per_example_grads(task, step["before"], step["batch"])
        parts = torch.split(grads, shapes, dim=1)
        expected = torch.cat([clipped_sum(g, c_layer) for g in parts]) * lr / dp.plan.batch_size
        torch.testing.assert_close(step["before"] - step["after"], expected, rtol=1e-3, atol=1e-7)


def test_adam_becomes_dp_adam_and_schedulers_keep_working(tmp_path):
    lrs = []

    class LR(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    dp = DifferentialPrivacy(noise_multiplier=1.0)
    task = tiny_task(
        optimizer=partial(torch.optim.Adam, lr=0.01),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1),
    )
    t = trainer(tmp_path, [dp, LR()], max_epochs=3)
    t.fit(task, datamodule=TinyData())
    opt = t.optimizers[0]
    assert isinstance(opt, DPOptimizer) and isinstance(opt.original_optimizer, torch.optim.Adam)
    assert lrs == pytest.approx([0.01, 0.001, 0.0001])
    assert dp.accountant.steps == 30


def test_secure_mode_without_torchcsprng_says_how_to_fix(tmp_path):
    dp = DifferentialPrivacy(noise_multiplier=1.0, secure_mode=True)
    t = trainer(tmp_path, [dp], max_steps=1)
    with pytest.raises(ValueError, match="torchcsprng"):
        t.fit(tiny_task(), datamodule=TinyData())


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_budget_is_respected_by_every_accountant(tmp_path, accountant):
    from dplit.privacy.accounting import compute_epsilon

    budget = 1.5
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3, max_epsilon=budget, accountant=accountant)
    t = trainer(tmp_path, [dp], max_epochs=50)
    t.fit(tiny_task(), datamodule=TinyData())
    n = dp.accountant.steps
    assert 0 < n < 500 and t.should_stop
    eps = lambda k: compute_epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=k, delta=1e-3, accountant=accountant)  # noqa: E731
    assert eps(n) <= budget < eps(n + 1)


def test_privacy_metrics_reach_the_csv_logger_at_its_interval(tmp_path):
    import csv

    from lightning.pytorch.loggers import CSVLogger

    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3)
    t = trainer(tmp_path, [dp], max_steps=7, log_every_n_steps=2, logger=CSVLogger(tmp_path, name=""))
    t.fit(tiny_task(), datamodule=TinyData())
    rows = [r for r in csv.DictReader(open(tmp_path / "version_0" / "metrics.csv")) if r.get("privacy/epsilon")]
    steps = [int(float(r["privacy/steps"])) for r in rows]
    assert steps[:3] == [2, 4, 6] and steps[-1] == 7  # every 2nd step, and the final spend at the end
    for r in rows:
        assert float(r["privacy/epsilon"]) == pytest.approx(
            rdp_epsilon(0.1, 1.0, int(float(r["privacy/steps"])), 1e-3), rel=0.01
        )


class ImageData(L.LightningDataModule):
    """Random 1x12x12 'images' with 3 classes, for conv layers."""

    def __init__(self, n: int = 64, batch_size: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 1, 12, 12, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.batch_size, self.group_names, self.num_classes = batch_size, ["all"], 3

    def train_dataloader(self):
        from dplit.data.base import GroupedTensorDataset

        data = GroupedTensorDataset(self.x, self.y, torch.zeros(len(self.y), dtype=torch.long))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size, shuffle=True)


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=1, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=0, bias=False),
        nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 3),
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["bookkeeping", "ghost", "hooks"])
def test_conv_update_is_clipped_mean_of_per_example_grads(tmp_path, mode):
    from dplit.tasks import ClassificationTask

    c, lr = 0.05, 0.5
    probe = Probe()
    task = ClassificationTask(conv_net(), optimizer=partial(torch.optim.SGD, lr=lr))
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=c, grad_sample_mode=mode)
    t = trainer(tmp_path, [dp, probe], max_steps=3)
    t.fit(task, datamodule=ImageData())
    assert len(probe.steps) == 3
    for step in probe.steps:
        model = conv_net()
        torch.nn.utils.vector_to_parameters(step["before"], model.parameters())
        x, y, _ = step["batch"]
        rows = []
        for i in range(len(y)):
            loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))]))
        expected = lr * clipped_sum(torch.stack(rows), c) / dp.plan.batch_size
        torch.testing.assert_close(step["before"] - step["after"], expected, rtol=1e-3, atol=1e-7)
