"""Privacy budget: the noise for a target epsilon, and how many steps fit under a budget (computed once)."""

from __future__ import annotations

import logging
import math

from dplit.privacy.accounting import (
    PrivacyAccountant,
    calibrate_noise_multiplier,
    calibrate_noise_multiplier_no_amplification,
)
from dplit.privacy.config import PrivacyConfig, PrivacyConfigError
from dplit.privacy.engine import SamplingPlan

log = logging.getLogger(__name__)


def planned_steps(max_steps: int | None, max_epochs: int | None, steps_per_epoch: int) -> int:
    """Logical steps the run plans to take (``max_steps`` wins, as in Lightning)."""
    if max_steps is not None and max_steps > 0:
        return max_steps
    if max_epochs is not None and max_epochs > 0:
        return max_epochs * steps_per_epoch
    raise PrivacyConfigError(
        "`target_epsilon` is calibrated over the planned number of steps: set `trainer.max_epochs` or "
        "`trainer.max_steps`, or give `noise_multiplier` instead."
    )


def resolve_noise_multiplier(config: PrivacyConfig, plan: SamplingPlan, steps: int | None, passes: int | None) -> float:
    """The configured noise multiplier, or the smallest one that keeps the plan within ``target_epsilon``.

    Poisson sampling: ``steps`` subsampled Gaussians. Otherwise ``passes`` Gaussians without amplification, the
    bound the accountant reports (one per pass over the data that starts).
    """
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    assert config.target_epsilon is not None
    if config.poisson_sampling:
        assert steps is not None
        sigma = calibrate_noise_multiplier(
            target_epsilon=config.target_epsilon,
            sample_rate=plan.sample_rate,
            steps=steps,
            delta=config.delta,
            accountant=config.accountant,
        )
        log.info("Calibrated noise_multiplier=%.4f for epsilon=%g over %d steps", sigma, config.target_epsilon, steps)
        return sigma
    assert passes is not None
    sigma = calibrate_noise_multiplier_no_amplification(
        target_epsilon=config.target_epsilon,
        epochs_participated=passes,
        delta=config.delta,
        accountant=config.accountant,
    )
    log.info("Calibrated noise_multiplier=%.4f for epsilon=%g over %d passes", sigma, config.target_epsilon, passes)
    return sigma


def steps_per_epoch(limit_train_batches: int | float, logical_steps_per_epoch: int) -> int:
    """Logical steps Lightning runs an epoch under ``limit_train_batches`` (at most: virtual steps can make fewer)."""
    if isinstance(limit_train_batches, int):
        return max(0, min(limit_train_batches, logical_steps_per_epoch))
    return max(0, min(logical_steps_per_epoch, int(logical_steps_per_epoch * limit_train_batches)))


def planned_passes(max_steps: int | None, max_epochs: int | None, steps_per_epoch: int) -> int:
    """Passes over the data a non-Poisson run plans: each epoch starts one (a shorter epoch still does)."""
    if max_steps is not None and max_steps > 0:
        passes = math.ceil(max_steps / max(1, steps_per_epoch))
        return min(passes, max_epochs) if max_epochs is not None and max_epochs > 0 else passes
    if max_epochs is not None and max_epochs > 0:
        return max_epochs
    raise PrivacyConfigError(
        "`target_epsilon` is calibrated over the planned number of passes: set `trainer.max_epochs` or "
        "`trainer.max_steps`, or give `noise_multiplier` instead."
    )


def steps_within_budget(
    accountant: PrivacyAccountant, *, events: list[tuple[float, float]], delta: float, budget: float
) -> int:
    """Largest n >= 0 such that n more steps, each spending ``events``, keep epsilon <= ``budget``.

    Epsilon is non-decreasing in the number of steps, so an exponential then a binary search needs
    O(log n) accountant calls: affordable once per fit even for the PRV accountant, unlike a check every step.
    """

    def fits(n: int) -> bool:
        return n == 0 or accountant.epsilon_with([(sigma, q, n) for sigma, q in events], delta) <= budget

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10**9:
            return lo
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def step_limit(accountant: PrivacyAccountant, config: PrivacyConfig, events: list[tuple[float, float]]) -> int | None:
    """Total steps allowed by ``config.budget`` (None without a budget); refuses a budget below one step.

    Args:
        events: the privacy events of one released step (the DP algorithm's list).
    """
    budget = config.budget
    if budget is None:
        return None
    more = steps_within_budget(accountant, events=events, delta=config.delta, budget=budget)
    if more == 0 and accountant.steps == 0:
        first = accountant.epsilon_with([(sigma, q, 1) for sigma, q in events], config.delta)
        raise PrivacyConfigError(
            f"A single step already spends epsilon={first:.3g} > budget {budget} (`max_epsilon`). Raise the budget or "
            "`noise_multiplier`."
        )
    log.info("Privacy budget epsilon=%g allows %d steps in all (%d more).", budget, accountant.steps + more, more)
    return accountant.steps + more


__all__ = [
    "planned_passes",
    "planned_steps",
    "resolve_noise_multiplier",
    "step_limit",
    "steps_per_epoch",
    "steps_within_budget",
]
