"""Privacy units (several rows per dataset item) and the DP algorithm registry, checked against per-example
autograd and dp-accounting."""

from __future__ import annotations

import dp_accounting
import lightning as L
import pytest
import torch
from dp_helpers import trainer
from torch import nn
from torch.utils.data import DataLoader

from dplit.callbacks import DifferentialPrivacy
from dplit.data.base import GroupedTensorDataset
from dplit.privacy.accounting import RDP_ORDERS, PrivacyAccountant
from dplit.privacy.algorithms import ALGORITHMS, DPAlgorithm, SensitivityError, register_algorithm
from dplit.privacy.backends import GhostLossError

C, K, DIM = 1.0, 3, 5


class ViewsData(L.LightningDataModule):
    """Each dataset item (the privacy unit) holds K views ``[K, DIM]``; groups 0/1 alternate."""

    def __init__(self, scales: list[float], k: int = K) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n = len(scales)
        self.x = torch.randn(n, k, DIM, generator=g)
        self.y = torch.tensor(scales)  # regression targets: the gradient grows with the target
        self.group = torch.arange(n) % 2
        self.group_names, self.num_classes = ["a", "b"], 2

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GroupedTensorDataset(self.x, self.y, self.group), batch_size=len(self.y))


class ViewsTask(L.LightningModule):
    """Flattens each item's K views unit-major into K rows; mean squared error over rows; SGD lr 1."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(DIM, 4), nn.Tanh(), nn.Linear(4, 1))
        with torch.no_grad():  # outputs start near 0: each gradient scales with the target
            self.net[2].weight.mul_(1e-3)
            self.net[2].bias.zero_()
        self.criterion = nn.MSELoss()
        self.seen: list = []

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.seen.append((x.clone(), y.clone()))
        rows = x.reshape(-1, DIM)  # [B*K, DIM], item 0's K rows first
        target = y.float().repeat_interleave(x.shape[1])
        return {"loss": self.criterion(self.net(rows).squeeze(-1), target)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=1.0)


def unit_grads(task: ViewsTask, params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Independent reference: per unit, the mean over its K rows of each row's own loss gradient. [B, P]."""
    net = ViewsTask().net
    nn.utils.vector_to_parameters(nn.utils.parameters_to_vector(params), net.parameters())
    out = []
    for i in range(len(y)):
        rows = []
        for k in range(x.shape[1]):
            loss = nn.functional.mse_loss(net(x[i, k : k + 1]).squeeze(-1), y[i : i + 1].float())
            rows.append(torch.autograd.grad(loss, list(net.parameters())))
        out.append(sum(torch.cat([g.reshape(-1) for g in row]) for row in rows) / len(rows))
    return torch.stack(out)


def run(mode: str, scales: list[float], algorithm: str = "dpsgd", k: int = K):
    task, data = ViewsTask(), ViewsData(scales, k)
    before = [p.detach().clone() for p in task.net.parameters()]
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=C, grad_sample_mode=mode, algorithm=algorithm)
    trainer("/tmp", [dp], max_steps=1, enable_checkpointing=False).fit(task, datamodule=data)
    after = [p.detach() for p in task.net.parameters()]
    update = torch.cat([(b - a).reshape(-1) for b, a in zip(before, after, strict=True)])
    (x, y), = task.seen  # fmt: skip
    return dp, update, unit_grads(task, before, x, y), data.group


@pytest.mark.parametrize("mode", ["hooks", "functorch", "bookkeeping"])
def test_a_units_rows_are_combined_before_clipping(mode):
    dp, update, grads, _ = run(mode, [1e4])  # one unit, huge gradient: its K rows together move the model <= C
    assert grads.norm() > 100 * C
    assert update.norm() <= C * (1 + 1e-4)
    torch.testing.assert_close(update, grads[0] * C / grads[0].norm(), rtol=1e-5, atol=1e-7)
    dp, update, grads, _ = run(mode, [1e-3, 0.1, 3.0, 1e3])  # q = 1: B * update = sum of clipped unit gradients
    norms = grads.norm(dim=1)
    assert (norms < C).any() and (norms > C).any()
    expected = (grads * (C / norms).clamp(max=1.0)[:, None]).sum(0)
    torch.testing.assert_close(update * 4, expected, rtol=1e-5, atol=1e-6)
    assert dp.accountant.steps == 1


@pytest.mark.parametrize("mode", ["hooks", "functorch", "bookkeeping"])
def test_units_are_items_also_with_several_group_attributes(mode):
    """group [B, A] (several attributes): the units are still the B items, not the B*K rows (before the fix, one
    item's 3 views moved the model by 2.90 C)."""
    task, data = ViewsTask(), ViewsData([1e4, 1e4])
    data.group = torch.stack([torch.arange(2) % 2, torch.tensor([1, 0])], dim=1)  # [2 items, 2 attributes]
    before = [p.detach().clone() for p in task.net.parameters()]
    dp = DifferentialPrivacy(noise_multiplier=1e-9, max_grad_norm=C, grad_sample_mode=mode)
    trainer("/tmp", [dp], max_steps=1, enable_checkpointing=False).fit(task, datamodule=data)
    update = torch.cat([(b - a.detach()).reshape(-1) for b, a in zip(before, task.net.parameters(), strict=True)])
    (x, y), = task.seen  # fmt: skip
    grads = unit_grads(task, before, x, y)
    expected = (grads * (C / grads.norm(dim=1))[:, None]).sum(0) / 2  # two units, each clipped to C, q = 1
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("mode", "error"), [("ghost", GhostLossError)])  # book-keeping: transformer_rules.to_units
def test_backends_that_clip_rows_refuse_multi_row_units(mode, error):
    with pytest.raises(error, match="K rows of a privacy unit"):
        run(mode, [1.0, 2.0])


class HalfForGroupB(DPAlgorithm):
    """Clips group 1 to C/2 and releases a second noisy statistic each step (declared as an event)."""

    name = "test_half_for_b"

    def clip_factors(self, norms, groups):
        bound = torch.where(groups == 1, self.max_grad_norm / 2, self.max_grad_norm)
        return (bound / (norms + 1e-6)).clamp(max=1.0)

    def events(self):
        return [(self.noise_multiplier, self.sample_rate), (4.0, self.sample_rate)]


class Overshoot(DPAlgorithm):
    name = "test_overshoot"

    def clip_factors(self, norms, groups):
        return torch.ones_like(norms)  # no clipping at all: must be refused


@pytest.fixture(autouse=True, scope="module")
def _registered():
    register_algorithm(HalfForGroupB.name, HalfForGroupB)
    register_algorithm(Overshoot.name, Overshoot)
    yield
    del ALGORITHMS[HalfForGroupB.name], ALGORITHMS[Overshoot.name]


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_a_registered_algorithm_weights_by_group_and_its_events_are_accounted(mode):
    dp, update, grads, group = run(mode, [1e-3, 0.1, 3.0, 1e3, 50.0, 0.5], algorithm=HalfForGroupB.name, k=1)
    bound = torch.where(group == 1, C / 2, C).double()
    expected = (grads * (bound / grads.norm(dim=1)).clamp(max=1.0)[:, None]).sum(0)
    torch.testing.assert_close(update.double() * 6, expected.double(), rtol=1e-5, atol=1e-6)
    assert dp.accountant.history == [(1e-9, 1.0, 1), (4.0, 1.0, 1)]  # both declared events recorded


def test_an_algorithms_declared_events_are_composed_like_dp_accounting():
    algorithm = HalfForGroupB(max_grad_norm=C, noise_multiplier=1.0, sample_rate=0.05, num_groups=2)
    acc = PrivacyAccountant("rdp")
    for _ in range(40):
        acc.record(algorithm.events())
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)),
                dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(4.0)),
            ]
        ),
        40,
    )
    orders = list(RDP_ORDERS)  # dp_accounting's default orders plus more: the same bound, evaluated on more orders
    reference = dp_accounting.rdp.RdpAccountant(orders).compose(event).get_epsilon(1e-5)
    single = dp_accounting.rdp.RdpAccountant(orders).compose(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.0)), 40
    )
    assert acc.epsilon(1e-5) == pytest.approx(reference, rel=1e-3)  # Opacus vs dp_accounting RDP: within 0.1%
    assert acc.epsilon(1e-5) > single.get_epsilon(1e-5) * (1 + 1e-3)  # the extra release costs something


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_factors_beyond_the_sensitivity_are_refused_before_release(mode):
    with pytest.raises(SensitivityError, match="exceeds the sensitivity"):
        run(mode, [1e3, 2.0], algorithm=Overshoot.name, k=1)


def test_unknown_algorithm_names_the_choices():
    with pytest.raises(ValueError, match="algorithm.*dpsgd"):
        DifferentialPrivacy(noise_multiplier=1.0, algorithm="dpsgd_x")
