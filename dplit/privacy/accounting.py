"""Privacy accounting for DP-SGD: sample rate, epsilon, noise calibration and the accountant's saved state.

Poisson sampling: a Poisson-subsampled Gaussian mechanism (add/remove-one adjacency), with Opacus' accountants; RDP
uses ``dp_accounting``'s orders, a superset of Opacus' alphas. Shuffled fixed-size batches are NOT Poisson and the
Poisson number can under-report their loss (Chua et al. 2024, "How private are DP-SGD implementations?"), so
for them no amplification is claimed: an example is in at most one batch of each pass over the data, so under
zero-out adjacency (Kairouz et al. 2021) the run composes one Gaussian mechanism per pass that actually started
(every reshuffle: each epoch, each resume). A valid (loose) upper bound whatever the batch order.
"""

import contextlib
import functools
import math
import warnings
from typing import Any, Literal

from opacus.accountants import GaussianAccountant, IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.analysis import gdp as gdp_analysis
from opacus.accountants.analysis import rdp as rdp_analysis

AccountantName = Literal["rdp", "prv", "gdp"]
History = tuple[tuple[float, float, int], ...]  # ((noise_multiplier, sample_rate, num_steps), ...)

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant, "gdp": GaussianAccountant}
RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])
SIGMA_BOUNDS: tuple[float, float] = (0.01, 1000.0)
PRV_MAX_RDP_EPSILON = 100.0  # beyond it (no privacy) PRV takes minutes or >100 GB (sigma=0.1): report RDP, a bound


class UnreachableEpsilonError(ValueError):
    """No noise multiplier within ``SIGMA_BOUNDS`` reaches the target epsilon."""

    def __init__(self, message: str, reachable_epsilon: float) -> None:
        super().__init__(message)
        self.reachable_epsilon = reachable_epsilon


def register_accountant(name: str, cls: type[IAccountant]) -> None:
    """Registers an Opacus accountant class under ``name`` (refuses to silently replace a different class)."""
    if ACCOUNTANTS.get(name, cls) is not cls:
        raise ValueError(f"accountant name {name!r} is already registered to {ACCOUNTANTS[name].__name__}")
    ACCOUNTANTS[name] = cls


def make_opacus_accountant(name: str) -> IAccountant:
    """Returns a fresh Opacus accountant for ``name`` (one of ``ACCOUNTANTS``)."""
    _check_name(name)
    return ACCOUNTANTS[name]()


def sample_rate_for(batch_size: int, dataset_size: int) -> float:
    """Poisson sample rate q = batch_size / dataset_size, validated to lie in (0, 1]."""
    if not 1 <= batch_size <= dataset_size:
        raise ValueError(f"batch_size={batch_size} must be in [1, dataset_size={dataset_size}]")
    return batch_size / dataset_size


def compute_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps (0.0 for no steps, inf for zero noise)."""
    return _epsilon(accountant, ((float(noise_multiplier), float(sample_rate), int(steps)),), float(delta))


def compute_epsilon_no_amplification(
    *, noise_multiplier: float, epochs_participated: int, delta: float, accountant: AccountantName = "rdp"
) -> float:
    """Epsilon for shuffled fixed-size batches, claiming no amplification by subsampling.

    An example is in one batch per epoch: under zero-out adjacency (Kairouz et al. 2021) the run composes
    ``epochs_participated`` Gaussian mechanisms (a valid upper bound for any batch order; exact mu-GDP for gdp).
    """
    history = ((float(noise_multiplier), 1.0, int(epochs_participated)),)
    return _epsilon_no_amplification(accountant, history, float(delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
    rtol: float = 1e-3,
) -> float:
    """Smallest noise multiplier whose Poisson epsilon is in [target * (1 - rtol), target]; never above target.

    Raises:
        UnreachableEpsilonError: even the largest noise multiplier in ``SIGMA_BOUNDS`` overshoots the target.
        ValueError: invalid arguments, or the target is met even by the smallest noise multiplier.
    """
    eps = functools.partial(compute_epsilon, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant)
    setting = f"accountant={accountant!r}, sample_rate={sample_rate:.4g}, steps={steps}, delta={delta:g}"
    return _bisect(eps, target_epsilon, rtol, setting, "take fewer steps (fewer epochs), use a smaller batch")


def calibrate_noise_multiplier_no_amplification(
    *,
    target_epsilon: float,
    epochs_participated: int,
    delta: float,
    accountant: AccountantName = "rdp",
    rtol: float = 1e-3,
) -> float:
    """``calibrate_noise_multiplier`` for the no-amplification bound (shuffled fixed-size batches)."""
    eps = functools.partial(
        compute_epsilon_no_amplification, epochs_participated=epochs_participated, delta=delta, accountant=accountant
    )
    setting = f"accountant={accountant!r}, no Poisson sampling, epochs={epochs_participated}, delta={delta:g}"
    return _bisect(eps, target_epsilon, rtol, setting, "train fewer epochs, use Poisson sampling")


Event = tuple[float, float]  # (noise_multiplier, sample_rate): one Gaussian mechanism, Poisson-subsampled at rate q
"""A privacy event: ``sample_rate == 1.0`` is a Gaussian mechanism without amplification by subsampling."""


class PrivacyAccountant:
    """Composes the privacy events that actually ran, and reports epsilon.

    Each logical (noised) step records the list of events it spent: one Poisson-subsampled Gaussian
    ``(sigma, q)`` for DP-SGD's gradient; more for an algorithm that also releases noisy statistics; a Gaussian
    without subsampling ``(sigma, 1.0)`` when a non-Poisson pass over the data starts (an example joins at most one
    batch of a pass, so under zero-out adjacency the pass is one Gaussian mechanism, whatever the batch order);
    none for the other steps of such a pass. The history is the composition ``[(sigma, q, count), ...]``
    (consecutive equal events merged); ``steps`` counts the logical steps separately.

    Args:
        mechanism: accountant name in ``ACCOUNTANTS``.

    Cost of epsilon: rdp ~0.05 ms, gdp ~2 ms, prv 0.05-2 s for each new history (cached by (history, delta)).
    """

    STATE_VERSION = 2

    def __init__(self, mechanism: AccountantName = "rdp") -> None:
        _check_name(mechanism)
        if mechanism == "gdp":
            warnings.warn("gdp (a CLT approximation) can under-report epsilon; prefer rdp or prv", stacklevel=2)
        self.mechanism = mechanism
        self.history: list[tuple[float, float, int]] = []
        self.steps = 0

    def record(self, events: list[Event] | tuple[Event, ...]) -> None:
        """Records one logical step that spent ``events`` (possibly none: a later step of a non-Poisson pass)."""
        history = self.history
        for sigma, q in events:
            history = _extended(history, 1, sigma, q)
        self.history = history
        self.steps += 1

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Records one DP-SGD step: a single Poisson-subsampled Gaussian."""
        self.record([(noise_multiplier, sample_rate)])

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything recorded so far."""
        return _epsilon(self.mechanism, tuple(self.history), float(delta))

    def epsilon_with(self, extra: list[tuple[float, float, int]], delta: float) -> float:
        """Epsilon after composing ``extra`` events ``(sigma, q, count)`` with the history (to stop before a budget)."""
        history = self.history
        for sigma, q, n in extra:
            history = _extended(history, n, sigma, q)
        return _epsilon(self.mechanism, tuple(history), float(delta))

    def epsilon_after(self, extra_steps: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
        """Epsilon after ``extra_steps`` more DP-SGD steps with these settings."""
        return self.epsilon_with([(noise_multiplier, sample_rate, extra_steps)], delta)

    def state_dict(self) -> dict[str, Any]:
        """Plain python state (loads under ``torch.load(weights_only=True)``)."""
        return {
            "version": self.STATE_VERSION,
            "mechanism": self.mechanism,
            "steps": int(self.steps),
            "history": [[float(s), float(q), int(n)] for s, q, n in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the history after checking that the state belongs to an accountant like this one.

        States written before events (version 1) are converted conservatively: a Poisson history is kept as it is;
        a non-Poisson one (whose per-epoch composition under-counted reshuffled passes) counts every step as a full
        Gaussian mechanism, a valid upper bound.
        """
        if state.get("mechanism") != self.mechanism:
            raise ValueError(
                f"accountant state has mechanism={state.get('mechanism')!r} but this accountant has "
                f"{self.mechanism!r}: resume with the original privacy settings (a restart from scratch is a new run)"
            )
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        if not all(s >= 0 and 0 < q <= 1 and n >= 1 for s, q, n in history):
            raise ValueError(f"invalid accountant history {history}: entries must be (sigma >= 0, 0 < q <= 1, n >= 1)")
        if state.get("version", 1) < 2:
            steps = sum(n for _, _, n in history)
            if state.get("poisson", True) is False:
                history = [(s, 1.0, n) for s, _, n in history]
        else:
            steps = int(state["steps"])
        self.history, self.steps = history, steps


def _check_name(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {name!r}")


def _extended(history: list, n: int, sigma: float, q: float) -> list[tuple[float, float, int]]:
    sigma, q = float(sigma), float(q)  # numpy scalars out: the state must load with weights_only=True
    if not (n >= 0 and sigma >= 0 and 0 < q <= 1):
        raise ValueError(f"need steps >= 0, noise_multiplier >= 0, 0 < sample_rate <= 1; got {n}, {sigma}, {q}")
    if history and history[-1][:2] == (sigma, q):
        return [*history[:-1], (sigma, q, history[-1][2] + n)]
    return [*history, (sigma, q, n)]


def _validate(mechanism: str, history: History, delta: float) -> None:
    _check_name(mechanism)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    for sigma, q, n in history:
        if not (sigma >= 0 and 0 < q <= 1 and n >= 0):
            raise ValueError(f"need noise_multiplier >= 0, 0 < sample_rate <= 1, steps >= 0; got {sigma}, {q}, {n}")


@functools.lru_cache(maxsize=4096)
def _epsilon(mechanism: str, history: History, delta: float) -> float:
    """Epsilon of a composition of (Poisson-subsampled) Gaussians ``(sigma, q, n)``; cached by its arguments."""
    _validate(mechanism, history, delta)
    history = tuple(h for h in history if h[2] > 0)
    if not history or min(sigma for sigma, _, _ in history) == 0:
        return math.inf if history else 0.0
    if mechanism == "gdp" and all(q == 1.0 for _, q, _ in history):
        # Exact: Gaussian mechanisms with noise multipliers sigma_i compose to mu-GDP, mu = sqrt(sum n_i / sigma_i^2).
        return _gdp_epsilon(math.sqrt(sum(n / sigma**2 for sigma, _, n in history)), delta)
    if mechanism == "gdp" and len(history) > 1:
        raise ValueError("the gdp accountant needs a constant noise_multiplier and sample_rate; use rdp or prv")
    with warnings.catch_warnings():  # Opacus: "optimal order is the largest alpha", gdp "experimental", log(1 - 1)
        warnings.simplefilter("ignore")
        if mechanism == "rdp" or (mechanism == "prv" and _epsilon("rdp", history, delta) > PRV_MAX_RDP_EPSILON):
            rdp = sum(n * _rdp_per_step(sigma, q) for sigma, q, n in history)
            return max(0.0, float(rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)[0]))
        if mechanism == "gdp":  # what opacus' GaussianAccountant computes, plus epsilon=0 for tiny mu
            ((sigma, q, n),) = history
            return _gdp_epsilon(gdp_analysis.compute_mu_poisson(steps=n, noise_multiplier=sigma, sample_rate=q), delta)
        acc = ACCOUNTANTS[mechanism]()
        acc.history = list(history)
        return float(acc.get_epsilon(delta))


def _gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with delta(epsilon) <= delta for mu-GDP (0 if already at epsilon=0, inf beyond 500)."""
    if gdp_analysis.delta_eps_mu(eps=0.0, mu=mu) <= delta:
        return 0.0
    try:
        return float(gdp_analysis.eps_from_mu(mu=mu, delta=delta))
    except ValueError:
        return math.inf


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(sigma: float, q: float) -> Any:  # numpy array over RDP_ORDERS
    return rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(RDP_ORDERS))


def _epsilon_no_amplification(mechanism: str, history: History, delta: float) -> float:
    """Epsilon of a composition of Gaussian mechanisms (no subsampling): ``history`` entries are (sigma, _, n)."""
    return _epsilon(mechanism, tuple((sigma, 1.0, n) for sigma, _, n in history if n > 0), delta)


def _bisect(eps_of: functools.partial[float], target: float, rtol: float, setting: str, advice: str) -> float:
    """Smallest sigma with target*(1-rtol) <= eps_of(sigma) <= target: bracketed search, hi always within budget."""
    if not (0 < target < math.inf and 0 < rtol < 1):
        raise ValueError(f"need a positive finite target_epsilon and 0 < rtol < 1, got {target} and {rtol}")
    lo, hi = SIGMA_BOUNDS
    eps_hi = eps_of(noise_multiplier=hi)
    if eps_hi > target:
        raise UnreachableEpsilonError(
            f"target_epsilon={target:g} cannot be reached ({setting}): even noise_multiplier={hi:g} gives "
            f"epsilon={eps_hi:.4g}, the smallest reachable here. To reach the target, {advice}, or use a larger "
            "delta (keeping delta < 1/N).",
            reachable_epsilon=eps_hi,
        )
    eps_lo = eps_of(noise_multiplier=lo)
    if eps_lo <= target:
        raise ValueError(f"target_epsilon={target:g} is met even with noise_multiplier={lo:g}: no privacy ({setting})")
    probes: list[float] = []  # PRV takes ~1 s a call: first probe around the (cheap) RDP calibration
    if eps_of.keywords.get("accountant") == "prv":
        with contextlib.suppress(ValueError):
            guess = _bisect(functools.partial(eps_of, accountant="rdp"), target, 1e-2, setting, advice)
            probes = [guess, guess / 1.1, guess / 1.25]
    for _ in range(200):
        if eps_hi >= target * (1 - rtol) or hi / lo < 1 + 1e-12:
            break
        # Regula falsi on log(eps) vs log(sigma), aiming inside the window, kept 10% away from the bracket's ends.
        ratio = eps_lo / eps_hi if eps_hi > 0 else math.inf  # > 1: eps_lo > target >= eps_hi
        t = math.log(eps_lo / target / (1 - rtol / 2)) / math.log(ratio) if ratio < math.inf else 0.5
        mid = probes.pop(0) if probes else lo * (hi / lo) ** min(max(t, 0.1), 0.9)
        if not lo < mid < hi:
            continue
        eps_mid = eps_of(noise_multiplier=mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo, eps_lo = mid, eps_mid
    return hi
