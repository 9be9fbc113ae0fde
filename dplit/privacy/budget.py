"""Privacy budget: how many more steps fit under an epsilon budget (computed once, not every step)."""

from __future__ import annotations

from dplit.privacy.accounting import PrivacyAccountant


def steps_within_budget(
    accountant: PrivacyAccountant, *, noise_multiplier: float, sample_rate: float, delta: float, budget: float
) -> int:
    """Largest n >= 0 such that taking n more steps keeps epsilon <= ``budget``.

    Epsilon is non-decreasing in the number of steps, so an exponential then a binary search needs
    O(log n) accountant calls: affordable once per fit even for the PRV accountant, unlike a check every step.
    """

    def fits(n: int) -> bool:
        return n == 0 or accountant.epsilon_after(n, noise_multiplier, sample_rate, delta) <= budget

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


__all__ = ["steps_within_budget"]
