"""PrivacyConfig: the public hyper-parameters of a DP run, validated once, hashed for resume checks."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Literal

AccountantName = Literal["rdp", "prv", "gdp"]
ClippingMode = Literal["flat", "per_layer"]
GradSampleMode = Literal["hooks", "functorch", "ghost", "bookkeeping"]


ALGORITHM_HYPERPARAMETERS = (
    "count_noise",
    "global_threshold",
    "target_quantile",
    "adapt_lr",
    "min_clip",
    "max_clip",
    "stability",
)
"""``PrivacyConfig`` fields read only by some DP algorithms (each algorithm lists its own in ``hyperparameters``)."""


class PrivacyConfigError(ValueError):
    """A privacy hyper-parameter is missing, contradictory or out of range."""


@dataclass(frozen=True)
class PrivacyConfig:
    """Public hyper-parameters of DP-SGD/DP-Adam. Nothing here depends on the data."""

    noise_multiplier: float | None = None
    """Std of the Gaussian noise relative to ``max_grad_norm``. Give this or ``target_epsilon``, not both."""
    target_epsilon: float | None = None
    """Epsilon to reach at the end of the planned training; the noise multiplier is calibrated to it and
    training stops before it would be exceeded."""
    max_epsilon: float | None = None
    """Optional budget with a fixed ``noise_multiplier``: training stops before epsilon would exceed it."""
    max_grad_norm: float = 1.0
    """Clipping bound C on each example's gradient (flat: whole-model norm; per_layer: split evenly so the
    whole-model norm is still <= C)."""
    delta: float = 1e-5
    """Target delta; should be well below 1/N (a warning says so otherwise)."""
    accountant: AccountantName = "rdp"
    """Privacy accountant: ``rdp`` (Renyi DP), ``prv`` (privacy random variables, tighter), ``gdp`` (Gaussian DP
    CLT approximation: not an upper bound for small N or few steps)."""
    clipping: ClippingMode = "flat"
    """Per-sample clipping: ``flat`` over all parameters, or ``per_layer``."""
    algorithm: str = "dpsgd"
    """DP algorithm (a name in ``dplit.privacy.algorithms.ALGORITHMS``): how each example's gradient is weighted
    before the noise, and which privacy events each step spends. ``dpsgd``: flat clipping to ``max_grad_norm``."""
    count_noise: float | None = None
    """dpsgd_f, global_adapt, adaptive_clipping: std of the Gaussian noise on each noisy count they release (default
    10). The step's ``noise_multiplier`` is shared with these counts: the gradient gets slightly more noise."""
    global_threshold: float | None = None
    """global_adapt: initial upper threshold Z on gradient norms (default 100; kept >= ``max_grad_norm``)."""
    target_quantile: float | None = None
    """global_adapt: fraction of examples with norm <= Z (default 0.9); adaptive_clipping: fraction left unclipped
    (default 0.5)."""
    adapt_lr: float | None = None
    """global_adapt / adaptive_clipping: step of the geometric threshold update (defaults 1.0 / 0.2)."""
    min_clip: float | None = None
    """adaptive_clipping: lower bound on the adapted clip bound (default ``max_grad_norm``)."""
    max_clip: float | None = None
    """adaptive_clipping: upper bound on the adapted clip bound (default: none)."""
    stability: float | None = None
    """automatic_clipping: gamma in ``C g / (||g|| + gamma)`` (default 0.01)."""
    grad_sample_mode: GradSampleMode = "hooks"
    """How per-sample gradients are obtained: ``hooks`` (Opacus hooks), ``functorch`` (vmap), ``ghost``
    (ghost clipping: per-sample norms without per-sample gradients; flat clipping only), ``bookkeeping``
    (book-keeping clipping, one backward pass; Linear/Conv2d models, flat clipping only)."""
    poisson_sampling: bool = True
    """Poisson sampling (what the accountant assumes). If false, batches are shuffled fixed-size batches and the
    reported epsilon is the no-amplification bound: one Gaussian mechanism per pass over the data that started
    (each epoch, each resume), under zero-out adjacency."""
    max_physical_batch_size: int | None = None
    """Split each logical (Poisson) batch into physical batches of at most this size (virtual steps): same
    privacy, less memory."""
    secure_mode: bool = False
    """Cryptographically secure noise and sampling (needs ``torchcsprng``). Without it the generators are still
    seeded from OS entropy, never from the run's seed."""
    insecure_testing_seed: int | None = None
    """TESTS ONLY: derive the sampling and noise from this number, which the run's config publishes, so that
    anyone can regenerate the noise and the guarantee does not hold. Recorded in the run's privacy state and
    warned about on every fit."""

    def __post_init__(self) -> None:
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise PrivacyConfigError(
                "Set exactly one of `noise_multiplier` and `target_epsilon` on DifferentialPrivacy "
                f"(got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon})."
            )
        if self.noise_multiplier is not None and not (
            self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)
        ):
            raise PrivacyConfigError(
                f"`noise_multiplier` must be a positive number, got {self.noise_multiplier}. Without noise there is "
                "no privacy: train without the DifferentialPrivacy callback instead."
            )
        for name in ("target_epsilon", "max_epsilon"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise PrivacyConfigError(f"`{name}` must be > 0, got {value}.")
        if self.target_epsilon is not None and self.max_epsilon is not None:
            raise PrivacyConfigError(
                "`max_epsilon` is the budget for a fixed `noise_multiplier`; with "
                "`target_epsilon` the target is the budget. Remove `max_epsilon`."
            )
        if not self.max_grad_norm > 0:
            raise PrivacyConfigError(f"`max_grad_norm` must be > 0, got {self.max_grad_norm}.")
        if not 0 < self.delta < 1:
            raise PrivacyConfigError(f"`delta` must be in (0, 1), got {self.delta}.")
        if self.accountant not in ("rdp", "prv", "gdp"):
            raise PrivacyConfigError(f"`accountant` must be one of rdp, prv, gdp; got {self.accountant!r}.")
        if self.clipping not in ("flat", "per_layer"):
            raise PrivacyConfigError(f"`clipping` must be flat or per_layer; got {self.clipping!r}.")
        if self.grad_sample_mode not in ("hooks", "functorch", "ghost", "bookkeeping"):
            raise PrivacyConfigError(
                f"`grad_sample_mode` must be hooks, functorch, ghost or bookkeeping; got {self.grad_sample_mode!r} "
                "(Opacus' `ew` mode needs the wrapper's forward and does not work under Lightning)."
            )
        if self.grad_sample_mode in ("ghost", "bookkeeping") and self.clipping != "flat":
            raise PrivacyConfigError(f"`grad_sample_mode: {self.grad_sample_mode}` supports `clipping: flat` only.")
        from dplit.privacy.algorithms import ALGORITHMS

        if self.algorithm not in ALGORITHMS:
            raise PrivacyConfigError(
                f"`algorithm` must be one of {', '.join(sorted(ALGORITHMS))}; got {self.algorithm!r}."
            )
        used = ALGORITHMS[self.algorithm].hyperparameters
        for name in ALGORITHM_HYPERPARAMETERS:
            value = getattr(self, name)
            if value is None:
                continue
            if name not in used:
                users = sorted(a for a, cls in ALGORITHMS.items() if name in cls.hyperparameters)
                raise PrivacyConfigError(
                    f"`{name}` is a hyper-parameter of {', '.join(users)}; `algorithm: {self.algorithm}` does not use "
                    f"it. Remove `{name}` or choose one of those algorithms."
                )
            if not (value > 0 and math.isfinite(value)):
                raise PrivacyConfigError(f"`{name}` must be a positive number, got {value}.")
        if self.algorithm != "dpsgd" and (self.clipping != "flat" or not self.poisson_sampling):
            raise PrivacyConfigError(
                f"`algorithm: {self.algorithm}` needs `clipping: flat` and Poisson sampling (its extra releases are "
                "accounted as subsampled mechanisms)."
            )
        if self.max_physical_batch_size is not None and self.max_physical_batch_size < 1:
            raise PrivacyConfigError(f"`max_physical_batch_size` must be >= 1, got {self.max_physical_batch_size}.")

    def algorithm_kwargs(self) -> dict[str, float]:
        """The DP algorithm's hyper-parameters that were set (the algorithm supplies defaults for the rest)."""
        return {k: getattr(self, k) for k in ALGORITHM_HYPERPARAMETERS if getattr(self, k) is not None}

    @property
    def budget(self) -> float | None:
        """Epsilon that training must not exceed (the target, or ``max_epsilon``), if any."""
        return self.target_epsilon if self.target_epsilon is not None else self.max_epsilon

    def fingerprint(self, **resolved: float | int | str | bool | None) -> str:
        """Hash of everything that changes the privacy guarantee, plus resolved values (sigma, q, N).

        Implementation choices that do not change the guarantee (grad_sample_mode, max_physical_batch_size,
        secure_mode, insecure_testing_seed) are left out, so a run may resume with them changed.
        """
        keys = asdict(self)
        for k in ("grad_sample_mode", "max_physical_batch_size", "secure_mode", "insecure_testing_seed"):
            keys.pop(k)
        keys.update(resolved)
        return hashlib.sha256(json.dumps(keys, sort_keys=True, default=repr).encode()).hexdigest()[:16]


__all__ = [
    "ALGORITHM_HYPERPARAMETERS",
    "AccountantName",
    "ClippingMode",
    "GradSampleMode",
    "PrivacyConfig",
    "PrivacyConfigError",
]
