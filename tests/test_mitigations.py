"""The disparate-impact mitigations (dplit.privacy.mitigations): clip rules and released statistics against
hand-computed values, the applied update against per-example autograd, the noise std measured on the update, and
epsilon against dp-accounting's composition of the same joint mechanism."""

from __future__ import annotations

import math

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
from dplit.privacy.algorithms import build_algorithm, make_algorithm
from dplit.privacy.config import PrivacyConfig, PrivacyConfigError

DIM = 6
BASE = dict(max_grad_norm=1.0, noise_multiplier=1e-4, sample_rate=0.1, num_groups=2, dataset_size=40)


def algo(name: str, **kwargs):
    a = make_algorithm(name, **{**BASE, **kwargs})
    a.bind_noise(torch.Generator().manual_seed(0), False)
    return a


# ---------------------------------------------------------------- clip rules and statistics, by hand
def test_dpsgd_f_bounds_come_from_the_noisy_per_group_clipped_fractions():
    a = algo("dpsgd_f", count_noise=1e-3)
    norms, groups = torch.tensor([0.5, 2.0, 4.0]), torch.tensor([0, 0, 1])
    assert a.sensitivity == 2.0  # no estimate yet: b_k all equal, C_k = C0 (1 + 1)
    torch.testing.assert_close(a.clip_factors(norms, groups), torch.tensor([1.0, 1.0, 0.5]), atol=1e-5, rtol=0)
    # a logical batch in two physical batches (virtual steps): counts add up. C0 = 1.
    a.observe(norms, groups)  # group 0: one clipped (2.0), one not (0.5); group 1: one clipped (4.0)
    a.observe(torch.tensor([0.9, 0.3, 0.2]), torch.tensor([1, 0, 0]))  # group 1: one not; group 0: two not
    metrics = a.on_release()
    expected = torch.tensor([1.0, 1.0, 3.0, 1.0], dtype=torch.float64)  # clipped (g0, g1), unclipped (g0, g1)
    torch.testing.assert_close(a.last_release, expected, atol=0.02, rtol=0)
    # b = (1/4, 1/2), mean 3/8: C_0 = 1 + (1/4)/(3/8) = 5/3, C_1 = 1 + (1/2)/(3/8) = 7/3
    assert metrics["clip_bound_g0"] == pytest.approx(5 / 3, abs=0.02)
    assert metrics["clip_bound_g1"] == pytest.approx(7 / 3, abs=0.02)
    assert a.sensitivity == pytest.approx(7 / 3, abs=0.02)
    factors = a.clip_factors(torch.tensor([2.0, 2.0]), torch.tensor([0, 1]))  # 2 > C_0 = 5/3; 2 < C_1 = 7/3
    assert factors[0] == pytest.approx(5 / 6, abs=0.01) and factors[1] == 1.0


def test_global_adapt_scales_small_gradients_by_c_over_z_and_tracks_a_quantile():
    a = algo("global_adapt", count_noise=1e-3, global_threshold=4.0)
    norms = torch.tensor([0.5, 2.0, 8.0])
    # ||g|| <= Z: times C/Z = 1/4 (so 0.5 -> 0.125, 2 -> 0.5); above Z: clipped to C (8 -> 1)
    torch.testing.assert_close(a.clip_factors(norms, None), torch.tensor([0.25, 0.25, 0.125]))
    a.observe(norms, None)  # centred count: (1 + 1 + 0) - 3/2 = 1/2
    metrics = a.on_release()
    assert float(a.last_release[0]) == pytest.approx(0.5, abs=0.01)
    # B_exp = q N = 4: fraction below Z = 0.5/4 + 1/2 = 0.625; Z <- 4 exp(-(0.625 - 0.9))
    assert metrics["global_threshold"] == pytest.approx(4 * math.exp(0.275), rel=1e-3)
    a = algo("global_adapt", count_noise=1e-3, global_threshold=0.2)  # Z is kept >= C
    assert a.threshold == 1.0


def test_bounded_adaptive_clipping_follows_the_quantile_within_its_bounds():
    a = algo("adaptive_clipping", count_noise=1e-3, min_clip=0.5, max_clip=3.0)
    assert a.sensitivity == 1.0
    norms = torch.tensor([0.2, 0.4, 0.6, 2.0])
    torch.testing.assert_close(a.clip_factors(norms, None), torch.tensor([1.0, 1.0, 1.0, 0.5]), atol=1e-5, rtol=0)
    a.observe(norms, None)  # unclipped 3 of 4: centred 3 - 2 = 1; fraction 1/4 + 1/2 = 0.75
    a.on_release()
    assert a.clip == pytest.approx(math.exp(-0.2 * (0.75 - 0.5)), rel=1e-3)
    for _ in range(30):  # everything unclipped, again and again: C falls, but never below min_clip
        a.observe(torch.full((4,), 0.01), None)
        a.on_release()
    assert a.clip == pytest.approx(0.5)
    assert algo("adaptive_clipping").min_clip == 1.0  # default lower bound: the constant bound it replaces


def test_automatic_clipping_normalises_every_gradient():
    a = algo("automatic_clipping", stability=0.01)
    norms = torch.tensor([0.0, 1.0, 99.99])
    torch.testing.assert_close(a.clip_factors(norms, None), torch.tensor([100.0, 1 / 1.01, 0.01]))
    assert a.gradient_noise_multiplier == a.noise_multiplier  # releases nothing else


def test_the_released_counts_carry_noise_of_the_configured_std():
    a = make_algorithm("adaptive_clipping", **{**BASE, "noise_multiplier": 0.8, "count_noise": 7.0})
    a.bind_noise(torch.Generator().manual_seed(1), False)
    draws = []
    for _ in range(3000):
        a.observe(torch.tensor([0.1, 5.0, 0.2]), None)  # true centred count: 2 - 3/2 = 1/2
        a.on_release()
        draws.append(float(a.last_release[0]))
    draws_t = torch.tensor(draws)
    assert draws_t.std().item() == pytest.approx(7.0, rel=0.05)
    assert draws_t.mean().item() == pytest.approx(0.5, abs=0.5)


def test_state_round_trips():
    cases = [("dpsgd_f", "bounds", None), ("global_adapt", "threshold", 7.5), ("adaptive_clipping", "clip", 2.5)]
    for name, attr, value in cases:
        a = algo(name)
        if value is None:
            a.bounds = torch.tensor([1.5, 2.5], dtype=torch.float64)
        else:
            setattr(a, attr, value)
        b = algo(name)
        b.load_state_dict(a.state_dict())
        assert torch.equal(torch.as_tensor(getattr(b, attr)), torch.as_tensor(getattr(a, attr)))


# ---------------------------------------------------------------- accounting
@pytest.mark.parametrize(("name", "sensitivity"), [("dpsgd_f", 1.0), ("global_adapt", 0.5), ("adaptive_clipping", 0.5)])
def test_epsilon_is_dp_accountings_composition_of_the_joint_gradient_and_count_release(name, sensitivity):
    sigma, q, steps, count_noise = 0.9, 0.02, 300, 3.0
    a = make_algorithm(name, **{**BASE, "noise_multiplier": sigma, "sample_rate": q, "count_noise": count_noise})
    acc = PrivacyAccountant("rdp")
    for _ in range(steps):
        acc.record(a.events())
    # independent reference: per step, ONE Poisson sample feeds a Gaussian on the gradient sum (noise sigma_g,
    # sensitivity 1 after normalising) and one on the counts (std count_noise, sensitivity as stated in the papers)
    joint = dp_accounting.PoissonSampledDpEvent(
        q,
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.GaussianDpEvent(a.gradient_noise_multiplier),
                dp_accounting.GaussianDpEvent(count_noise / sensitivity),
            ]
        ),
    )
    reference = dp_accounting.rdp.RdpAccountant(list(RDP_ORDERS)).compose(joint, steps).get_epsilon(1e-5)
    assert acc.epsilon(1e-5) == pytest.approx(reference, rel=1e-3)
    assert a.gradient_noise_multiplier > sigma * 1.01  # the counts' share is paid with more gradient noise
    dpsgd = PrivacyAccountant("rdp")
    for _ in range(steps):
        dpsgd.step(sigma, q)
    assert acc.epsilon(1e-5) == pytest.approx(dpsgd.epsilon(1e-5), rel=1e-9)  # equal epsilon at equal sigma


# ---------------------------------------------------------------- the applied update, through a real fit
class Data(L.LightningDataModule):
    """Regression items whose gradient norms spread over four orders of magnitude; groups 0/1 alternate."""

    def __init__(self, scales: list[float], batch_size: int | None = None, zero: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        n = len(scales)
        self.x = torch.zeros(n, DIM) if zero else torch.randn(n, DIM, generator=g)
        self.y = torch.zeros(n) if zero else torch.tensor(scales)
        self.group = torch.arange(n) % 2
        self.group_names, self.num_classes = ["a", "b"], 2
        self.batch_size = batch_size or n

    def train_dataloader(self) -> DataLoader:
        return DataLoader(GroupedTensorDataset(self.x, self.y, self.group), batch_size=self.batch_size)


class Task(L.LightningModule):
    def __init__(self, width: int = 4, out: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(DIM, width), nn.Tanh(), nn.Linear(width, out))
        with torch.no_grad():
            self.net[2].weight.mul_(1e-3)
            self.net[2].bias.zero_()
        self.criterion = nn.MSELoss()  # ghost clipping hooks the criterion
        self.params_at_step: list[list[torch.Tensor]] = []
        self.batches: list = []

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        self.params_at_step.append([p.detach().clone() for p in self.net.parameters()])
        self.batches.append((x.clone(), y.clone()))
        return {"loss": self.criterion(self.net(x).mean(-1), y.float())}

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=1.0)


def per_example_grads(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Independent reference: each example's own loss gradient by plain autograd, [B, P]."""
    net = Task().net
    nn.utils.vector_to_parameters(nn.utils.parameters_to_vector(params), net.parameters())
    rows = []
    for i in range(len(y)):
        loss = nn.functional.mse_loss(net(x[i : i + 1]).mean(-1), y[i : i + 1].float())
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))]))
    return torch.stack(rows)


def hand_factors(name: str, norms: torch.Tensor, groups: torch.Tensor, released: torch.Tensor | None):
    """The papers' rules written out again from scratch, C = 1 (the rule of step 2 uses step 1's exact counts)."""
    if name == "automatic_clipping":
        return 1.0 / (norms + 0.01)
    if name == "global_adapt":
        z = 3.0 if released is None else 3.0 * math.exp(-(float(released[0]) / 6 + 0.5 - 0.9))
        return torch.where(norms <= z, 1.0 / z, 1.0 / norms)
    if name == "adaptive_clipping":
        c = 1.0 if released is None else max(0.3, math.exp(-0.2 * (float(released[0]) / 6 + 0.5 - 0.5)))
        return (c / norms).clamp(max=1.0)
    if released is None:
        bound = torch.full_like(norms, 2.0)
    else:
        m, o = released[:2].clamp(min=0), released[2:].clamp(min=0)
        b = m / (m + o)
        bound = (1 + b / b.mean())[groups].to(norms.dtype)
    return (bound / norms).clamp(max=1.0)


EXTRA = {
    "dpsgd_f": {"count_noise": 1e-6},
    "global_adapt": {"count_noise": 1e-6, "global_threshold": 3.0},
    "adaptive_clipping": {"count_noise": 1e-6, "min_clip": 0.3},
    "automatic_clipping": {},
}


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
@pytest.mark.parametrize("name", sorted(EXTRA))
def test_each_step_applies_the_rule_to_per_example_gradients(name, mode, tmp_path):
    scales = [1e-3, 0.05, 0.5, 3.0, 40.0, 1e3]  # q = 1, six examples, norms from ~0 to far above every bound
    task, data = Task(), Data(scales)
    dp = DifferentialPrivacy(
        noise_multiplier=1e-9, max_grad_norm=1.0, grad_sample_mode=mode, algorithm=name, **EXTRA[name]
    )
    trainer(tmp_path, [dp], max_steps=2, max_epochs=2).fit(task, datamodule=data)
    after = [p.detach() for p in task.net.parameters()]
    released = None
    for step in range(2):
        before = task.params_at_step[step]
        end = task.params_at_step[step + 1] if step == 0 else after
        update = torch.cat([(b - a).reshape(-1) for b, a in zip(before, end, strict=True)]).double()
        x, y = task.batches[step]
        grads = per_example_grads(before, x, y).double()
        norms = grads.norm(dim=1)
        factors = hand_factors(name, norms, data.group, released)
        torch.testing.assert_close(update * len(scales), (grads * factors[:, None]).sum(0), rtol=1e-4, atol=1e-6)
        if name != "automatic_clipping":  # the exact statistic of this step, for the next step's rule
            if name == "dpsgd_f":
                clipped = norms > 1.0
                released = torch.tensor(
                    [float((clipped & (data.group == k)).sum()) for k in (0, 1)]
                    + [float((~clipped & (data.group == k)).sum()) for k in (0, 1)]
                )
            else:
                threshold = 3.0 if name == "global_adapt" else 1.0
                released = torch.tensor([float((norms <= threshold).sum()) - 3.0])
    assert dp.accountant.steps == 2


@pytest.mark.parametrize(("name", "clip", "extra", "sensitivity"), [
    ("dpsgd_f", 1.0, {"count_noise": 2.0}, 2.0),  # first step: C_k = 2 C0 for every group
    ("adaptive_clipping", 0.5, {"count_noise": 1.0, "min_clip": 0.7}, 0.7),  # C starts at max(C0, min_clip)
    ("automatic_clipping", 0.7, {}, 0.7),
])  # fmt: skip
def test_the_gradient_noise_has_std_sigma_g_times_the_sensitivity(name, clip, extra, sensitivity, tmp_path):
    # zero inputs and targets: every per-example gradient is 0, the update is the noise alone (SGD lr 1, / B)
    task, data = Task(width=400, out=25), Data([0.0] * 8, zero=True)
    with torch.no_grad():
        task.net[2].weight.zero_()
    dp = DifferentialPrivacy(noise_multiplier=0.8, max_grad_norm=clip, algorithm=name, **extra)
    trainer(tmp_path, [dp], max_steps=1).fit(task, datamodule=data)
    before, = task.params_at_step  # fmt: skip
    noise = torch.cat([(b - a).reshape(-1) for b, a in zip(before, task.net.parameters(), strict=True)]) * 8
    count = extra.get("count_noise", math.inf) / (1.0 if name == "dpsgd_f" else 0.5)
    sigma_g = (0.8**-2 - count**-2) ** -0.5  # the joint mechanism's share left for the gradient
    assert noise.std().item() == pytest.approx(sigma_g * sensitivity, rel=0.03)  # ~10,000 draws
    assert noise.mean().item() == pytest.approx(0.0, abs=0.05)


# ---------------------------------------------------------------- bad input
def test_a_budget_too_small_for_the_statistics_is_refused_naming_the_field():
    with pytest.raises(PrivacyConfigError, match="too small for the noisy statistics.*`count_noise`"):
        make_algorithm("dpsgd_f", **{**BASE, "noise_multiplier": 5.0, "count_noise": 4.0})


def test_a_hyperparameter_of_another_algorithm_is_refused():
    with pytest.raises(PrivacyConfigError, match="`min_clip` is a hyper-parameter of adaptive_clipping"):
        DifferentialPrivacy(noise_multiplier=1.0, algorithm="dpsgd_f", min_clip=0.1)
    with pytest.raises(PrivacyConfigError, match="`count_noise` must be a positive number"):
        DifferentialPrivacy(noise_multiplier=1.0, algorithm="dpsgd_f", count_noise=-1.0)
    with pytest.raises(ValueError, match="adaptive_clipping, automatic_clipping, dpsgd, dpsgd_f, global_adapt"):
        DifferentialPrivacy(noise_multiplier=1.0, algorithm="fair")


def test_per_group_rules_need_groups_and_ids_within_the_group_names():
    cfg = PrivacyConfig(noise_multiplier=1.0, algorithm="dpsgd_f")
    kwargs = dict(noise_multiplier=1.0, sample_rate=0.1, dataset_size=10, generator=None)
    with pytest.raises(PrivacyConfigError, match="declares no `group_names`"):
        build_algorithm(cfg, group_names=[], **kwargs)
    a = build_algorithm(cfg, group_names=["a", "b"], **kwargs)
    with pytest.raises(RuntimeError, match="group id 2 is outside the DataModule's 2 `group_names`"):
        a.clip_factors(torch.ones(2), torch.tensor([0, 2]))


def test_target_epsilon_is_met_by_every_algorithm(tmp_path):
    for name in ("dpsgd_f", "global_adapt"):
        dp = DifferentialPrivacy(target_epsilon=2.0, delta=1e-3, max_grad_norm=1.0, algorithm=name)
        trainer(tmp_path, [dp], max_epochs=3).fit(Task(), datamodule=Data([1.0] * 20, batch_size=5))
        assert 1.9 < dp.epsilon <= 2.0
        assert dp.algorithm.gradient_noise_multiplier > dp.noise_multiplier
