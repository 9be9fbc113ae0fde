"""Privacy accounting for DP-SGD: sample rate, epsilon, noise calibration and the accountant's saved state.

Poisson sampling: a Poisson-subsampled Gaussian mechanism (add/remove-one adjacency), with Opacus' accountants; RDP
uses ``dp_accounting``'s orders, a superset of Opacus' alphas. Shuffled fixed-size batches are NOT Poisson and the
Poisson number can under-report their loss (Chua et al. 2024, "How private are DP-SGD implementations?"), so
for them no amplification is claimed: an example is in one batch per epoch, so under zero-out adjacency (Kairouz
et al. 2021) the run composes one Gaussian mechanism per epoch it joins. A valid (loose) upper bound whatever the
batch order: shuffled, fixed or adversarial.
"""

import contextlib
import functools
import itertools
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
_STATE_KEYS = ("mechanism", "poisson", "steps_per_epoch")


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


class PrivacyAccountant:
    """Owns the DP-SGD history ``[(noise_multiplier, sample_rate, num_steps), ...]`` and reports epsilon.

    Args:
        mechanism: accountant name in ``ACCOUNTANTS``.
        poisson: whether batches are Poisson-sampled; if not, epsilon is the no-amplification bound.
        steps_per_epoch: logical steps per epoch; required when ``poisson`` is false.

    Cost of epsilon: rdp ~0.05 ms, gdp ~2 ms, prv 0.05-2 s for each new history (cached by (history, delta)).
    """

    def __init__(self, mechanism: AccountantName = "rdp", poisson: bool = True, steps_per_epoch: int | None = None):
        _check_name(mechanism)
        if not poisson and (steps_per_epoch is None or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be >= 1 without Poisson sampling, got {steps_per_epoch}")
        if mechanism == "gdp":
            warnings.warn("gdp (a CLT approximation) can under-report epsilon; prefer rdp or prv", stacklevel=2)
        self.mechanism, self.poisson, self.steps_per_epoch = mechanism, poisson, steps_per_epoch
        self.history: list[tuple[float, float, int]] = []

    @property
    def steps(self) -> int:
        """Total logical DP steps taken."""
        return sum(n for _, _, n in self.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        """Records one logical DP step (consecutive identical steps are merged into one entry)."""
        self.history = _extended(self.history, 1, noise_multiplier, sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far (the no-amplification bound without Poisson sampling)."""
        return self._epsilon_of(tuple(self.history), delta)

    def epsilon_if_poisson(self, delta: float) -> float:
        """Epsilon if the batches had been Poisson-sampled (for comparison; optimistic when they were not)."""
        return _epsilon(self.mechanism, tuple(self.history), float(delta))

    def epsilon_after(self, extra_steps: int, noise_multiplier: float, sample_rate: float, delta: float) -> float:
        """Epsilon after ``extra_steps`` more steps with these settings (to stop before the budget is exceeded)."""
        return self._epsilon_of(tuple(_extended(self.history, extra_steps, noise_multiplier, sample_rate)), delta)

    def state_dict(self) -> dict[str, Any]:
        """Plain python state (loads under ``torch.load(weights_only=True)``)."""
        state = {key: getattr(self, key) for key in _STATE_KEYS}
        return {**state, "history": [[float(s), float(q), int(n)] for s, q, n in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the history after checking that the state belongs to an accountant like this one."""
        for key in _STATE_KEYS if not self.poisson else _STATE_KEYS[:2]:  # steps_per_epoch: only without Poisson
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"accountant state has {key}={state.get(key)!r} but this accountant has {getattr(self, key)!r}: "
                    "resume with the original privacy settings (a restart from scratch is a new run)"
                )
        history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
        if not all(s >= 0 and 0 < q <= 1 and n >= 1 for s, q, n in history):
            raise ValueError(f"invalid accountant history {history}: entries must be (sigma >= 0, 0 < q <= 1, n >= 1)")
        self.history = history

    def _epsilon_of(self, history: History, delta: float) -> float:
        if self.poisson:
            return _epsilon(self.mechanism, history, float(delta))
        assert self.steps_per_epoch is not None
        return _epsilon_no_amplification(self.mechanism, _per_epoch(history, self.steps_per_epoch), float(delta))


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


def _per_epoch(history: History, steps_per_epoch: int) -> History:
    """One Gaussian per epoch (an example joins at most one batch of it), with that epoch's smallest sigma."""
    sigmas: dict[int, float] = {}  # epoch -> smallest noise multiplier among its steps
    step = 0
    for sigma, _, n in history:
        for epoch in range(step // steps_per_epoch, (step + n - 1) // steps_per_epoch + 1) if n > 0 else ():
            sigmas[epoch] = min(sigmas.get(epoch, sigma), sigma)
        step += n
    return tuple((sigma, 1.0, len(list(run))) for sigma, run in itertools.groupby(sigmas.values()))


def _validate(mechanism: str, history: History, delta: float) -> None:
    _check_name(mechanism)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    for sigma, q, n in history:
        if not (sigma >= 0 and 0 < q <= 1 and n >= 0):
            raise ValueError(f"need noise_multiplier >= 0, 0 < sample_rate <= 1, steps >= 0; got {sigma}, {q}, {n}")


@functools.lru_cache(maxsize=4096)
def _epsilon(mechanism: str, history: History, delta: float) -> float:
    """Poisson epsilon of a history; cached by (mechanism, history, delta)."""
    _validate(mechanism, history, delta)
    history = tuple(h for h in history if h[2] > 0)
    if not history or min(sigma for sigma, _, _ in history) == 0:
        return math.inf if history else 0.0
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
    history = tuple((sigma, 1.0, n) for sigma, _, n in history if n > 0)
    if mechanism != "gdp":
        return _epsilon(mechanism, history, delta)
    _validate(mechanism, history, delta)
    if not history or min(sigma for sigma, _, _ in history) == 0:
        return math.inf if history else 0.0
    # Exact: n Gaussian mechanisms with noise multiplier sigma compose to mu-GDP with mu = sqrt(sum n / sigma^2).
    return _gdp_epsilon(math.sqrt(sum(n / sigma**2 for sigma, _, n in history)), delta)


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
