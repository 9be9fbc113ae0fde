"""DP-FedAvg's privacy mechanics, checked against independent references: noise once on the aggregate with std
z*S/(qN) (statistics over many draws), clipped client updates, Poisson participation counted over many rounds,
secret sampling, and user-level epsilon equal to dp-accounting's composition of the rounds."""

from __future__ import annotations

import math

import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from scipy import stats

from dplit.federated.dp import DPFedAvg, calibrate_rounds, clip_update, default_delta

pytestmark = pytest.mark.filterwarnings("ignore:DifferentialPrivacy. `insecure_testing_seed`")


def test_noise_is_added_once_to_the_sum_with_std_zS_over_qN():
    n, q, s, z, p = 40, 0.25, 2.0, 1.5, 4000
    agg = DPFedAvg(num_users=n, sample_rate=q, clip=s, noise_multiplier=z, delta=1e-3, testing_seed=3)
    draws = torch.stack([agg.aggregate([], p) for _ in range(25)]).double()  # zero updates: pure noise, [25, P]
    expected = z * s / (q * n)  # = 0.3
    std = float(draws.std())
    assert std == pytest.approx(expected, rel=0.02)  # twice-added noise would give sqrt(2) x, 41% more
    assert abs(float(draws.mean())) < 5 * expected / math.sqrt(draws.numel())
    # normality of the released coordinates (Kolmogorov-Smirnov against N(0, expected^2))
    assert stats.kstest(draws.flatten().numpy() / expected, "norm").pvalue > 1e-3


def test_known_updates_are_clipped_summed_and_divided_by_the_expected_count():
    n, q, s, p = 10, 0.5, 1.0, 3
    agg = DPFedAvg(num_users=n, sample_rate=q, clip=s, noise_multiplier=1e-9, delta=1e-3, testing_seed=0)
    huge, small = torch.tensor([300.0, 400.0, 0.0]), torch.tensor([0.0, 0.0, 0.5])
    out = agg.aggregate([huge, small], p)
    # huge is clipped to norm S (direction kept), small passes unchanged; the denominator is qN = 5, not 2
    assert torch.allclose(out, (torch.tensor([0.6, 0.8, 0.0]) + small) / 5, atol=1e-6)
    assert float(clip_update(huge, s).norm()) == pytest.approx(s)
    assert torch.equal(clip_update(small, s), small)


def test_fedavg_without_privacy_is_the_plain_mean():
    agg = DPFedAvg(num_users=10, sample_rate=0.5)
    out = agg.aggregate([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])], 2)
    assert torch.allclose(out, torch.tensor([1.0, 2.0]))
    assert not agg.private and math.isinf(agg.epsilon())
    assert agg.sample_round().round == 1 and agg.accountant.steps == 0


def test_poisson_participation_matches_q():
    n, q, rounds = 60, 0.2, 500
    agg = DPFedAvg(num_users=n, sample_rate=q, clip=1.0, noise_multiplier=1.0, delta=1e-3, testing_seed=11)
    counts = torch.zeros(n)
    sizes = []
    for _ in range(rounds):
        plan = agg.sample_round()
        counts[plan.participants] += 1
        sizes.append(len(plan.participants))
    # each user's participations ~ Binomial(rounds, q): none is implausible (two-sided, Bonferroni over users)
    pvalues = [stats.binomtest(int(c), rounds, q).pvalue for c in counts]
    assert min(pvalues) > 1e-3 / n
    # the round sizes vary like Binomial(N, q) (Poisson sampling), not fixed-size batches
    assert torch.tensor(sizes, dtype=torch.float).var() == pytest.approx(n * q * (1 - q), rel=0.25)
    assert agg.accountant.steps == rounds


def test_sampling_is_secret_not_derived_from_the_torch_seed():
    plans = []
    for _ in range(2):
        torch.manual_seed(0)  # the public experiment seed
        agg = DPFedAvg(num_users=200, sample_rate=0.5, clip=1.0, noise_multiplier=1.0, delta=1e-3)
        plans.append([agg.sample_round().participants for _ in range(3)])
        noise = agg.aggregate([], 8)
    assert plans[0] != plans[1]
    torch.manual_seed(0)
    assert not torch.equal(noise, torch.randn(8))


@pytest.mark.parametrize(("q", "z", "rounds"), [(0.05, 0.7, 20), (0.1, 1.0, 100), (0.02, 0.5, 50)])
def test_user_level_epsilon_equals_dp_accounting(q, z, rounds):
    n = 1000
    delta = default_delta(n)
    agg = DPFedAvg(num_users=n, sample_rate=q, clip=1.0, noise_multiplier=z, delta=delta, testing_seed=1)
    epsilons = []
    for _ in range(rounds):
        agg.sample_round()
        epsilons.append(agg.epsilon())
    assert all(b >= a for a, b in zip(epsilons, epsilons[1:], strict=False))  # never goes backwards
    event = SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)
    reference = RdpAccountant().compose(event).get_epsilon(delta)
    assert epsilons[-1] == pytest.approx(reference, rel=0.01)


def test_target_epsilon_calibrates_z_over_the_planned_rounds():
    n, q, rounds, target = 1000, 0.05, 30, 4.0
    z = calibrate_rounds(target_epsilon=target, sample_rate=q, rounds=rounds, delta=default_delta(n))
    event = SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds)
    reference = RdpAccountant().compose(event).get_epsilon(default_delta(n))
    assert target * 0.99 <= reference <= target * 1.001


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_users": 0, "sample_rate": 0.1}, "at least one user"),
        ({"num_users": 10, "sample_rate": 0.0}, "sample_rate"),
        ({"num_users": 10, "sample_rate": 0.1, "clip": 1.0}, "both clip"),
        ({"num_users": 10, "sample_rate": 0.1, "clip": 1.0, "noise_multiplier": 1.0, "delta": 0.2}, "below 1/N"),
    ],
)
def test_bad_aggregator_settings(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DPFedAvg(**kwargs)
