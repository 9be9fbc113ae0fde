"""Privacy accounting checked against independent references: Google's dp_accounting, direct numerical
integration of the Renyi divergence, and published epsilons (Abadi et al. 2016, the TF Privacy MNIST tutorial)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from dp_accounting import ComposedDpEvent, GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS, RdpAccountant
from scipy import integrate, optimize
from scipy.stats import norm

from dplit.epsilon import main
from dplit.privacy import accounting as acct
from dplit.privacy.accounting import ACCOUNTANTS, PrivacyAccountant, calibrate_noise_multiplier, compute_epsilon

DELTA = 1e-5
CALIBRATE_GDP_PRV = [("gdp", 1), ("gdp", 8), ("prv", 1), ("prv", 3)]
GRID = [(q, sigma, steps) for q in (0.001, 0.01, 0.1) for sigma in (0.6, 1.0, 2.0) for steps in (100, 1000, 10000)]


def eps(sigma: float, q: float, steps: int, accountant: str = "rdp", delta: float = DELTA) -> float:
    return compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant)


def no_amp(sigma: float, epochs: int, accountant: str = "rdp", delta: float = DELTA) -> float:
    return acct.compute_epsilon_no_amplification(
        noise_multiplier=sigma, epochs_participated=epochs, delta=delta, accountant=accountant
    )


def poisson_event(q: float, sigma: float, steps: int) -> ComposedDpEvent | SelfComposedDpEvent:
    return SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)


def reference_epsilon(event: ComposedDpEvent | SelfComposedDpEvent, method: str = "rdp", orders=None) -> float:
    return float((RdpAccountant(orders) if method == "rdp" else PLDAccountant()).compose(event).get_epsilon(DELTA))


def rdp_to_epsilon(orders, rdp, delta: float, classic: bool = False) -> float:
    """RDP -> (eps, delta): Balle et al. 2020 Thm 21 (as Opacus, dp_accounting) or Mironov 2017 Prop. 3 (old TF)."""
    a, rdp = np.asarray(orders, dtype=float), np.asarray(rdp, dtype=float)
    eps = rdp - np.log(delta) / (a - 1) if classic else rdp + np.log1p(-1 / a) - (np.log(delta) + np.log(a)) / (a - 1)
    return float(np.min(eps))


def rdp_by_quadrature(q: float, sigma: float, alpha: float) -> float:
    """D_alpha((1-q) N(0,s^2) + q N(1,s^2) || N(0,s^2)) by direct integration (Mironov et al. 2019, Sec. 3)."""

    def log_integrand(z: float) -> float:  # log of N(z; 0, s^2) * (mixture / N(z; 0, s^2))^alpha, unnormalised
        return -z * z / (2 * sigma**2) + alpha * math.log1p(q * math.expm1((2 * z - 1) / (2 * sigma**2)))

    peak = optimize.minimize_scalar(lambda z: -log_integrand(z), bounds=(-1.0, alpha + 1.0), method="bounded").x
    top = max(log_integrand(0.0), log_integrand(peak))
    lo, hi = min(0.0, peak) - 40 * sigma, max(0.0, peak) + 40 * sigma  # both modes, their tails included
    value, _ = integrate.quad(lambda z: math.exp(log_integrand(z) - top), lo, hi, points=[0.0, peak], limit=400)
    log_a = top + math.log(value) - 0.5 * math.log(2 * math.pi * sigma**2)
    return log_a / (alpha - 1)


@pytest.mark.parametrize(("q", "sigma", "steps"), GRID)
def test_rdp_epsilon_matches_dp_accounting(q, sigma, steps):
    ours, reference = eps(sigma, q, steps), reference_epsilon(poisson_event(q, sigma, steps))
    if reference < 50:
        assert ours == pytest.approx(reference, rel=0.01)
    else:
        # No privacy left. dp_accounting 0.6 drops orders < 2 whose series fails to converge (it logs a warning), so
        # its bound is looser; ours is checked by quadrature below.
        assert ours <= reference


@pytest.mark.parametrize(
    ("q", "sigma", "steps"), [(0.1, 0.6, 100), (0.1, 0.6, 1000), (0.1, 1.0, 10000), (0.01, 1.0, 1000)]
)
def test_rdp_epsilon_matches_numerical_integration(q, sigma, steps):
    orders = [a for a in acct.RDP_ORDERS if a <= 20]  # the optimal order is small in these settings
    rdp = [steps * rdp_by_quadrature(q, sigma, a) for a in orders]
    assert eps(sigma, q, steps) == pytest.approx(rdp_to_epsilon(orders, rdp, DELTA), rel=1e-6)


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "published"),
    [
        # TF Privacy tutorials/README.md table and compute_dp_sgd_privacy.py (MNIST, N=60000, B=256, delta=1e-5)
        (1.12, 256 / 60000, math.ceil(60 * 60000 / 256), 2.92),
        (0.6, 256 / 60000, math.ceil(30 * 60000 / 256), 9.74),
        (1.2, 256 / 60000, math.ceil(10 * 60000 / 256), 1.20),
        (4.0, 0.01, 10000, 1.26),  # Abadi et al. 2016, Sec. 3.1: q=0.01, sigma=4, T=10000, delta=1e-5 -> eps ~ 1.26
        (1.1, 256 / 60000, 14063, 3.01),  # sigma=1.1, 60 epochs: the often-quoted "~3" (tight conversion: 2.597)
    ],
)
def test_published_epsilons(sigma, q, steps, published):
    # The published numbers used the classic RDP conversion; our RDP curve reproduces them with it...
    our_rdp = steps * acct._rdp_per_step(sigma, q)
    assert rdp_to_epsilon(acct.RDP_ORDERS, our_rdp, DELTA, classic=True) == pytest.approx(published, rel=0.005)
    # ...and the reported epsilon uses the tighter conversion (Balle et al. 2020), exactly as dp_accounting does.
    assert eps(sigma, q, steps) == pytest.approx(reference_epsilon(poisson_event(q, sigma, steps)), rel=1e-3)
    assert eps(sigma, q, steps) <= published


@pytest.mark.parametrize(("q", "sigma", "steps"), [(0.01, 1.0, 1000), (0.1, 2.0, 100), (256 / 60000, 1.1, 14063)])
def test_prv_and_gdp_match_independent_references(q, sigma, steps):
    prv = eps(sigma, q, steps, "prv")
    assert prv == pytest.approx(reference_epsilon(poisson_event(q, sigma, steps), "pld"), rel=0.03)
    assert prv < eps(sigma, q, steps)  # tighter than RDP
    # Poisson gdp is the central-limit approximation mu = q sqrt(T (exp(1/sigma^2) - 1)) (Bu et al. 2020)...
    mu = q * math.sqrt(steps * math.expm1(sigma**-2))

    def delta_of(eps: float) -> float:  # ...and mu-GDP gives delta(eps) by Dong, Roth & Su 2019, Cor. 2.13
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - DELTA

    assert eps(sigma, q, steps, "gdp") == pytest.approx(optimize.brentq(delta_of, 0, 100), rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv", "gdp"])
@pytest.mark.parametrize(("sigma", "epochs"), [(1.0, 1), (1.1, 60), (2.0, 10)])
def test_no_amplification_is_composition_of_gaussians(accountant, sigma, epochs):
    ours = no_amp(sigma, epochs, accountant)
    event = SelfComposedDpEvent(GaussianDpEvent(sigma), epochs)
    reference = reference_epsilon(event, "rdp" if accountant == "rdp" else "pld")
    assert ours == pytest.approx(reference, rel=1e-6 if accountant == "rdp" else 0.01)
    q = 256 / 60000  # the optimistic Poisson number for the same epochs is never larger
    assert ours >= eps(sigma, q, math.ceil(epochs / q))


def test_rdp_orders_and_opacus_alphas_agree_with_dp_accounting(monkeypatch):
    assert list(acct.RDP_ORDERS) == list(DEFAULT_RDP_ORDERS)
    assert set(ACCOUNTANTS["rdp"].DEFAULT_ALPHAS) <= set(acct.RDP_ORDERS)  # so never looser than Opacus' own number
    monkeypatch.setattr(acct, "ACCOUNTANTS", dict(ACCOUNTANTS))
    acct.register_accountant("opacus_rdp", ACCOUNTANTS["rdp"])  # generic path: Opacus' own alphas
    assert isinstance(acct.make_opacus_accountant("opacus_rdp"), ACCOUNTANTS["rdp"])
    for q, sigma, steps in [(0.01, 1.0, 1000), (0.001, 2.0, 10000)]:
        theirs = eps(sigma, q, steps, "opacus_rdp")
        reference = reference_epsilon(poisson_event(q, sigma, steps), orders=ACCOUNTANTS["rdp"].DEFAULT_ALPHAS)
        assert theirs == pytest.approx(reference, rel=1e-6)
        assert eps(sigma, q, steps) <= theirs
    with pytest.raises(ValueError, match="already registered"):
        acct.register_accountant("rdp", ACCOUNTANTS["prv"])
    with pytest.raises(ValueError, match="accountant must be one of"):
        acct.make_opacus_accountant("moments")


@pytest.mark.parametrize(("accountant", "target"), [*[("rdp", t) for t in (0.5, 1, 3, 8)], *CALIBRATE_GDP_PRV])
def test_calibration_lands_just_below_target(accountant, target):
    setting = dict(sample_rate=256 / 60000, steps=5000, delta=DELTA, accountant=accountant)
    sigma = calibrate_noise_multiplier(target_epsilon=target, **setting)
    assert target * (1 - 0.01) <= compute_epsilon(noise_multiplier=sigma, **setting) <= target
    assert compute_epsilon(noise_multiplier=sigma * 0.99, **setting) > target  # and it is (nearly) the smallest


@pytest.mark.parametrize("accountant", ["rdp", "gdp"])
def test_calibration_without_amplification_and_at_zero_epsilon(accountant):
    setting = dict(epochs_participated=20, delta=DELTA, accountant=accountant)
    sigma = acct.calibrate_noise_multiplier_no_amplification(target_epsilon=4.0, **setting)
    assert 4.0 * 0.99 <= no_amp(sigma, 20, accountant) <= 4.0
    assert eps(1000, 0.1, 30, accountant, delta=1e-3) == 0.0  # the bracket's noisy end spends nothing
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, sample_rate=0.1, steps=30, delta=1e-3, accountant=accountant)
    assert 2.0 * 0.99 <= eps(sigma, 0.1, 30, accountant, delta=1e-3) <= 2.0


def test_errors_say_what_is_reachable_and_what_to_change():
    with pytest.raises(acct.UnreachableEpsilonError) as info:
        calibrate_noise_multiplier(target_epsilon=0.1, sample_rate=0.5, steps=20000, delta=DELTA)
    reachable = eps(1000, 0.5, 20000)
    assert isinstance(info.value, ValueError) and info.value.reachable_epsilon == reachable > 0.1
    needles = ["target_epsilon=0.1", f"epsilon={reachable:.4g}", "noise_multiplier=1000", "fewer epochs"]
    assert all(needle in str(info.value) for needle in [*needles, "smaller batch", "larger delta"])
    with pytest.raises(ValueError, match="no privacy"):
        calibrate_noise_multiplier(target_epsilon=1e9, sample_rate=0.01, steps=100, delta=DELTA)
    assert acct.sample_rate_for(256, 60000) == 256 / 60000 and acct.sample_rate_for(10, 10) == 1.0
    for batch, n in [(0, 10), (11, 10)]:
        with pytest.raises(ValueError, match="batch_size.*dataset_size"):
            acct.sample_rate_for(batch, n)


@pytest.mark.parametrize("accountant", ["rdp", "gdp", "prv"])
def test_epsilon_monotone_in_steps_and_noise(accountant):
    sigmas = [0.7, 1.0, 2.0] if accountant == "prv" else [0.5, 0.7, 1.0, 1.5, 2.0, 4.0]
    steps = [10, 100, 1000] if accountant == "prv" else [1, 10, 100, 1000, 10000]
    grid = np.array([[eps(sigma, 0.01, n, accountant) for n in steps] for sigma in sigmas])
    assert np.all(np.diff(grid, axis=1) >= 0)  # more steps never spend less
    assert np.all(np.diff(grid, axis=0) <= 0)  # more noise never spends more
    assert eps(1.0, 0.01, 0, accountant) == 0.0 and eps(0.0, 0.01, 1, accountant) == math.inf


def test_accountant_merges_history_and_composes_heterogeneous_steps():
    acc = PrivacyAccountant("rdp")
    for sigma, q in [(1.0, 0.01)] * 3 + [(np.float64(1.2), np.float32(0.02))] * 2 + [(1.0, 0.01)]:
        acc.step(sigma, q)
    q2 = float(np.float32(0.02))
    assert acc.history == [(1.0, 0.01, 3), (1.2, q2, 2), (1.0, 0.01, 1)] and acc.steps == 6
    assert all(type(s) is float and type(q) is float for s, q, _ in acc.history)  # numpy scalars converted
    event = ComposedDpEvent([poisson_event(0.01, 1.0, 3), poisson_event(q2, 1.2, 2), poisson_event(0.01, 1.0, 1)])
    assert acc.epsilon(DELTA) == pytest.approx(reference_epsilon(event), rel=1e-6)
    after = acc.epsilon_after(10, 1.0, 0.01, DELTA)
    for _ in range(10):
        acc.step(1.0, 0.01)
    assert acc.epsilon(DELTA) == after


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_state_dict_round_trip_through_weights_only_load(tmp_path, mechanism):
    acc, resumed = PrivacyAccountant(mechanism), PrivacyAccountant(mechanism)
    for i in range(30):
        acc.step(np.float64(1.0 if i < 20 else 1.3), np.float64(0.05))
    acc.record([])  # a step that spent nothing (a later batch of a non-Poisson pass) still counts as a step
    torch.save({"accountant": acc.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["accountant"]
    resumed.load_state_dict(state)
    assert resumed.history == acc.history and resumed.steps == 31 and resumed.epsilon(DELTA) == acc.epsilon(DELTA)
    with pytest.raises(ValueError, match="mechanism"):
        PrivacyAccountant("prv" if mechanism == "rdp" else "rdp").load_state_dict(state)


def test_events_of_one_step_compose_like_dp_accounting():
    """A step that also releases a noisy count spends two subsampled Gaussians; a non-Poisson pass one Gaussian."""
    acc = PrivacyAccountant("rdp")
    for _ in range(50):
        acc.record([(1.1, 0.02), (4.0, 0.02)])
    acc.record([(2.0, 1.0)])
    acc.record([])
    assert acc.steps == 52
    event = ComposedDpEvent([poisson_event(0.02, 1.1, 1), poisson_event(0.02, 4.0, 1)] * 50 + [GaussianDpEvent(2.0)])
    assert acc.epsilon(DELTA) == pytest.approx(reference_epsilon(event), rel=1e-6)
    assert acc.epsilon_with([(2.0, 1.0, 3)], DELTA) == pytest.approx(
        reference_epsilon(ComposedDpEvent([event, SelfComposedDpEvent(GaussianDpEvent(2.0), 3)])), rel=1e-6
    )


def test_version_1_non_poisson_state_is_converted_to_an_upper_bound():
    """Old checkpoints counted one Gaussian per ceil(N/B) steps (under-counting reshuffles): every step counts now."""
    old = {"mechanism": "rdp", "poisson": False, "steps_per_epoch": 10, "history": [[1.0, 0.1, 25]]}
    acc = PrivacyAccountant("rdp")
    acc.load_state_dict(old)
    assert acc.steps == 25 and acc.epsilon(DELTA) == no_amp(1.0, 25) > no_amp(1.0, 3)
    old_poisson = {"mechanism": "rdp", "poisson": True, "steps_per_epoch": None, "history": [[1.0, 0.1, 25]]}
    acc.load_state_dict(old_poisson)
    assert acc.steps == 25 and acc.epsilon(DELTA) == eps(1.0, 0.1, 25)


def test_gdp_composes_gaussians_without_subsampling_exactly():
    with pytest.warns(UserWarning, match="under-report"):
        acc = PrivacyAccountant("gdp")
    acc.record([(1.0, 1.0)])
    acc.record([(2.0, 1.0)])
    mu = math.sqrt(1 / 1.0**2 + 1 / 2.0**2)  # mu-GDP composition (Dong, Roth & Su 2019, Cor. 2)
    # delta(eps) of mu-GDP, Dong et al. Cor. 1, evaluated at our epsilon equals the target delta
    e = acc.epsilon(DELTA)
    assert norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) == pytest.approx(DELTA, rel=1e-4)


def test_gdp_accountant_refuses_changing_noise():
    with pytest.warns(UserWarning, match="under-report"):
        acc = PrivacyAccountant("gdp")
    acc.step(1.0, 0.01)
    acc.step(1.0, 0.01)
    assert acc.epsilon(DELTA) == eps(1.0, 0.01, 2, "gdp")
    acc.step(2.0, 0.01)
    with pytest.raises(ValueError, match="constant"):
        acc.epsilon(DELTA)


MNIST = ["--dataset-size", "60000", "--batch-size", "256", "--epochs", "60"]


def run_calculator(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out.strip().splitlines(), err


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calculator_prints_the_number_last(capsys, accountant):
    code, lines, err = run_calculator(capsys, [*MNIST, "--noise-multiplier", "1.1", "--accountant", accountant])
    assert code == 0 and err == "" and float(lines[-1]) == eps(1.1, 256 / 60000, 14063, accountant)
    assert all(text in "\n".join(lines) for text in ["14063", "Poisson", f"{256 / 60000:.6g}"])
    code, lines, _ = run_calculator(capsys, [*MNIST, "--target-epsilon", "3", "--accountant", accountant])
    assert code == 0 and 3 * 0.99 <= eps(float(lines[-1]), 256 / 60000, 14063, accountant) <= 3


def test_calculator_without_poisson_claims_no_amplification(capsys):
    code, lines, err = run_calculator(capsys, [*MNIST, "--noise-multiplier", "1.1", "--no-poisson", "--delta", "1e-4"])
    assert code == 0 and "warning" in err and "--delta" in err  # 1e-4 is not below 1/N = 1.7e-5
    assert float(lines[-1]) == no_amp(1.1, 60, delta=1e-4)
    poisson, text = eps(1.1, 256 / 60000, 14063, delta=1e-4), "\n".join(lines)
    assert "NOT claimed" in text and "60 Gaussian" in text
    assert f"for comparison only, if batches were Poisson-sampled: epsilon = {poisson:.4g}" in text


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--dataset-size", "100", "--batch-size", "256", "--epochs", "1", "--noise-multiplier", "1"], "--batch-size"),
        ([*MNIST, "--noise-multiplier", "1", "--target-epsilon", "2"], "--target-epsilon"),
        (MNIST, "--noise-multiplier"),
        ([*MNIST, "--target-epsilon", "0.001"], "--target-epsilon"),
        ([*MNIST[:-1], "0", "--noise-multiplier", "1"], "--epochs"),
        ([*MNIST, "--noise-multiplier", "-1"], "--noise-multiplier"),
        ([*MNIST, "--noise-multiplier", "1", "--delta", "2"], "--delta"),
        ([*MNIST, "--noise-multiplier", "1", "--accountant", "moments"], "--accountant"),
    ],
)
def test_calculator_bad_input_exits_2_naming_the_flag(capsys, argv, flag):
    code, lines, err = run_calculator(capsys, argv)
    assert code == 2 and flag in err and "Traceback" not in err and not lines  # nothing a script could misread


def test_calculator_runs_as_a_module():
    argv = [sys.executable, "-m", "dplit.epsilon", *MNIST, "--target-epsilon", "0.001"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == ""
    assert "--target-epsilon" in result.stderr and "cannot be reached" in result.stderr
