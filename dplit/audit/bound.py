"""Statistics of one-run privacy auditing (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training
Run", NeurIPS).

``m`` canaries are each included in training independently with probability 1/2. From the trained model an auditor
guesses "in" for some canaries, "out" for others and abstains on the rest: ``r`` guesses, ``v`` of them correct.
If training is (eps, delta)-DP, their Theorem 3.1 bounds the chance of ``v`` or more correct guesses by

    p(eps, delta) = f(v) + 2 m delta max_{i=1..v} (f(v - i) - f(v)) / i,   f(u) = P[Binomial(r, e^eps/(1+e^eps)) >= u]

(with delta = 0 this is the pure-DP statement: correct guesses are dominated by Binomial(r, e^eps/(1+e^eps))).
The audited lower bound at confidence 1 - beta is the largest eps with p(eps, delta) <= beta: any smaller claimed
epsilon is rejected at level beta. Binomial probabilities are computed here exactly in log space (no scipy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
"""Default grid of guess counts, as fractions of the canaries (Bonferroni-corrected over its distinct values)."""


def _log_q(eps: float) -> tuple[float, float]:
    """``(log q, log(1 - q))`` for q = e^eps / (1 + e^eps), the accuracy of eps-DP randomized response (eps >= 0)."""
    softplus = math.log1p(math.exp(-eps))  # log(1 + e^-eps), stable for every eps >= 0
    return -softplus, -eps - softplus


def _log_pmf(k: int, n: int, log_p: float, log_1mp: float) -> float:
    log_comb = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
    return log_comb + k * log_p + (n - k) * log_1mp


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(x - top) for x in values))


def log_binom_tail(v: int, n: int, p: float | None = None, *, eps: float | None = None) -> float:
    """``log P[Binomial(n, p) >= v]``, with ``p`` given directly or as ``e^eps / (1 + e^eps)``."""
    if v <= 0:
        return 0.0
    if v > n:
        return -math.inf
    if eps is not None:
        log_p, log_1mp = _log_q(eps)
    elif p is not None and 0.0 <= p <= 1.0:
        if p == 0.0:
            return -math.inf
        if p == 1.0:
            return 0.0
        log_p, log_1mp = math.log(p), math.log1p(-p)
    else:
        raise ValueError(f"log_binom_tail: give p in [0, 1] or eps >= 0, got p={p}, eps={eps}")
    return _logsumexp([_log_pmf(k, n, log_p, log_1mp) for k in range(v, n + 1)])


def p_value(m: int, r: int, v: int, eps: float, delta: float = 0.0) -> float:
    """Upper bound on P[>= v of r guesses correct] when training is (eps, delta)-DP (Theorem 3.1 of the paper).

    Args:
        m: canaries, each included independently with probability 1/2.
        r: guesses (canaries not abstained on), ``r <= m``.
        v: correct guesses, ``v <= r``.
        eps: epsilon of the null hypothesis, >= 0.
        delta: delta of the null hypothesis, in [0, 1].
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"p_value: need 0 <= v <= r <= m, got m={m}, r={r}, v={v}")
    if eps < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"p_value: need eps >= 0 and delta in [0, 1], got eps={eps}, delta={delta}")
    tail = math.exp(log_binom_tail(v, r, eps=eps))
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    log_q, log_1mq = _log_q(eps)
    alpha, below = 0.0, 0.0  # below = P[v - i <= Binomial(r, q) < v]
    for i in range(1, v + 1):
        below += math.exp(_log_pmf(v - i, r, log_q, log_1mq))
        alpha = max(alpha, below / i)
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(
    m: int, r: int, v: int, confidence: float = 0.95, delta: float = 0.0, tol: float = 1e-7
) -> float:
    """The largest eps that ``v`` correct of ``r`` guesses on ``m`` canaries rejects at ``confidence``.

    That is the largest eps with ``p_value(m, r, v, eps, delta) <= 1 - confidence`` (found by bisection; the
    p-value grows with eps); 0 when even eps = 0 is not rejected. The returned value errs low by at most ``tol``.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) <= beta:  # ends: p -> P[Binomial(r, 1) >= v] = 1 as eps grows
        lo, hi = hi, 2.0 * hi
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) <= beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class GuessResult:
    """The best guess count of a one-run audit and its bound."""

    epsilon_lower_bound: float
    """Audited lower bound on epsilon at ``confidence`` (after the Bonferroni correction over ``grid``)."""
    guesses: int
    """r: canaries guessed (k_plus "in" + k_minus "out"); the rest abstained on."""
    correct: int
    """v: correct guesses."""
    k_plus: int
    k_minus: int
    grid: tuple[int, ...]
    """The guess counts tried; the bound of each is taken at level (1 - confidence) / len(grid)."""


def guess_grid(m: int, fractions: Sequence[float] = DEFAULT_GUESS_FRACTIONS) -> tuple[int, ...]:
    """Distinct guess counts ``round(f * m)`` (at least 1, at most m) for the default fractions."""
    return tuple(sorted({min(m, max(1, round(f * m))) for f in fractions}))


def audit_from_scores(
    scores: torch.Tensor,
    included: torch.Tensor,
    confidence: float = 0.95,
    delta: float = 0.0,
    grid: Sequence[int] | None = None,
) -> GuessResult:
    """One-run audit from membership scores: the highest scores are guessed "in", the lowest "out".

    For each guess count r in ``grid`` (default: ``guess_grid(m)``), the ``ceil(r/2)`` highest-scoring canaries
    are guessed included and the ``floor(r/2)`` lowest-scoring excluded. Every r is tested at level
    ``(1 - confidence) / len(grid)`` (Bonferroni), so the best bound over the grid holds at ``confidence``;
    a grid of one r chosen before looking at the scores needs no correction.

    Args:
        scores: [m] membership scores (higher = more likely included), e.g. the negated loss on the canary.
        included: [m] bool, whether each canary was trained on.
        confidence: 1 - beta.
        delta: delta of the (eps, delta)-DP hypothesis tested.
        grid: guess counts r to try, each in 1..m.
    """
    m = len(scores)
    if m == 0 or len(included) != m:
        raise ValueError(f"audit_from_scores: need m >= 1 scores and as many inclusion flags, got {m}, {len(included)}")
    grid = tuple(sorted(set(grid))) if grid is not None else guess_grid(m)
    if not grid or any(not 1 <= r <= m for r in grid):
        raise ValueError(f"guess counts must be in 1..{m} (the canaries), got {list(grid)}")
    order = torch.argsort(scores.detach().cpu().double(), descending=True, stable=True)
    member = included.detach().cpu().bool()[order]  # member[j]: is the j-th highest-scoring canary included
    level = confidence if len(grid) == 1 else 1.0 - (1.0 - confidence) / len(grid)
    best: GuessResult | None = None
    for r in grid:
        k_plus, k_minus = (r + 1) // 2, r // 2
        correct = int(member[:k_plus].sum()) + int((~member[m - k_minus :]).sum())  # [m - 0:] is empty
        eps = epsilon_lower_bound(m, r, correct, level, delta)
        if best is None or eps >= best.epsilon_lower_bound:  # on ties, the most guesses
            best = GuessResult(eps, r, correct, k_plus, k_minus, grid)
    assert best is not None
    return best
