"""DP algorithms: how each example's gradient is weighted before the noise, and what each step spends.

An algorithm sees, for every physical batch, the pre-clipping per-unit gradient norms and the units' group ids (the
batch contract ``(x, y, group)``); it returns per-unit factors ``w_i`` whose weighted gradients ``w_i g_i`` all have
norm at most ``sensitivity`` (checked on every batch: a violation stops training before anything is released). On
each release it declares the privacy events the step spent (the noisy gradient sum, and any extra noisy statistic
it releases, e.g. a noisy count of clipped examples per group); the accountant composes them, and
``target_epsilon`` calibration uses the same list. The noise on the gradient sum has std
``noise_multiplier * sensitivity``.

DP-SGD (Abadi et al. 2016) is the first algorithm: ``w_i = min(1, C / ||g_i||)``, one subsampled Gaussian per step.
The mitigations of disparate impact (``dplit.privacy.mitigations``) are the others. Register more with
:func:`register_algorithm` (as Opacus registers accountants).

An algorithm that releases noisy statistics splits the configured ``noise_multiplier`` sigma between the gradient
sum and the statistics: the gradient gets ``gradient_noise_multiplier`` sigma_g >= sigma chosen so that the joint
Gaussian mechanism of one step (gradient sum and statistics, on the same Poisson sample) has the effective noise
multiplier ``(sigma_g^-2 + sum_j (s_j / D_j)^-2)^-1/2 = sigma`` (Andrew et al. 2021, Thm. 1; s_j, D_j: noise std and
L2 sensitivity of statistic j). Every algorithm therefore spends exactly the events of DP-SGD with the same sigma,
which is what makes comparisons at equal epsilon exact, and ``target_epsilon`` calibrates sigma for all of them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from dplit.privacy.accounting import Event


class SensitivityError(RuntimeError):
    """An algorithm returned factors that let some example's weighted gradient exceed the sensitivity."""


class DPAlgorithm:
    """Base class: DP-SGD's flat clipping. Subclasses override ``clip_factors`` / ``events`` / ``on_release``.

    Args:
        max_grad_norm: the clipping bound C.
        noise_multiplier: sigma of the gradient noise (relative to ``sensitivity``).
        sample_rate: Poisson sampling rate q of units.
        num_groups: number of subgroup ids the batches carry (0 if unknown).
    """

    name: ClassVar[str] = "dpsgd"
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    """Names of the ``DifferentialPrivacy`` arguments this algorithm reads (the others must stay unset)."""
    requires_groups: ClassVar[bool] = False
    """True if the clip rule needs each unit's group id (batches ``(x, y, group)``)."""
    elementwise_factors: ClassVar[bool] = True
    """True if ``clip_factors`` is a side-effect-free function of each unit's own norm and group id (given the
    algorithm's state): book-keeping may then call it on chunks of a batch (its one-pass conv clipping), checking
    the chunks' factors against the whole batch's. A subclass whose factors depend on the batch sets False."""

    def __init__(
        self,
        max_grad_norm: float,
        noise_multiplier: float,
        sample_rate: float,
        num_groups: int = 0,
        dataset_size: int = 0,
    ) -> None:
        self.max_grad_norm = max_grad_norm
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.num_groups = num_groups
        self.dataset_size = dataset_size
        self.generator: Any = None
        self.secure_mode = False

    def bind_noise(self, generator: Any, secure_mode: bool) -> None:
        """The secret generator of the step's noise; an algorithm's noisy statistics draw from it too."""
        self.generator, self.secure_mode = generator, secure_mode

    @property
    def gradient_noise_multiplier(self) -> float:
        """Std of the noise on the clipped gradient sum, relative to ``sensitivity`` (sigma when nothing else is
        released; larger when noisy statistics share the step's budget, see the module docstring)."""
        return self.noise_multiplier

    def observe(self, norms: torch.Tensor, groups: torch.Tensor | None) -> None:
        """Accumulate this physical batch's contribution to the statistics released with the next step."""

    def discard(self) -> None:
        """Forget statistics accumulated for a logical batch that is never released (cut, or refused)."""

    @property
    def sensitivity(self) -> float:
        """Bound on every unit's weighted gradient norm (the noise std is ``noise_multiplier`` times this)."""
        return self.max_grad_norm

    def clip_factors(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """Per-unit factors ``[B]`` for pre-clipping norms ``[B]`` (and group ids ``[B]``, when the batch has them)."""
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)

    def events(self) -> list[Event]:
        """Privacy events one released step spends under Poisson sampling (the gradient sum: one Gaussian)."""
        return [(self.noise_multiplier, self.sample_rate)]

    def on_release(self) -> dict[str, float]:
        """Update any state after a release (e.g. an adapted clip bound); returns metrics to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def build_algorithm(
    config: Any,
    *,
    noise_multiplier: float,
    sample_rate: float,
    dataset_size: int,
    group_names: list[str],
    generator: Any,
) -> DPAlgorithm:
    """The configured algorithm (a ``PrivacyConfig``'s ``algorithm`` and hyper-parameters) for one fit.

    Refuses a per-group rule without group names. Every registered algorithm runs under DDP (noisy statistics are
    summed across ranks and noised once, see ``mitigations``).
    """
    from dplit.privacy.config import PrivacyConfigError

    cls = ALGORITHMS[config.algorithm]
    if cls.requires_groups and not group_names:
        raise PrivacyConfigError(
            f"`algorithm: {config.algorithm}` clips each example by its group's bound, but the DataModule declares no "
            "`group_names`: use a dplit GroupedDataModule (batches (x, y, group)) or another algorithm."
        )
    algorithm = make_algorithm(
        config.algorithm,
        max_grad_norm=config.max_grad_norm,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        num_groups=len(group_names),
        dataset_size=dataset_size,
        **config.algorithm_kwargs(),
    )
    algorithm.bind_noise(None if config.secure_mode else generator, config.secure_mode)
    return algorithm


def split_noise(noise_multiplier: float, statistic_multipliers: list[float], field: str) -> float:
    """Gradient noise multiplier sigma_g with ``(sigma_g^-2 + sum_j m_j^-2)^-1/2 = noise_multiplier``.

    ``statistic_multipliers`` are the statistics' noise std divided by their L2 sensitivity. Refuses (naming
    ``field``) when the statistics alone would already spend the step's budget.
    """
    from dplit.privacy.config import PrivacyConfigError

    rest = noise_multiplier**-2 - sum(m**-2 for m in statistic_multipliers)
    if rest <= 0 or not math.isfinite(rest):
        needed = noise_multiplier * math.sqrt(len(statistic_multipliers))
        raise PrivacyConfigError(
            f"the privacy budget is too small for the noisy statistics: the step's noise multiplier is "
            f"{noise_multiplier:.4g} (from `noise_multiplier` / `target_epsilon`), and `{field}` gives the statistics "
            f"noise multipliers {', '.join(f'{m:.4g}' for m in statistic_multipliers)}, which alone spend at least "
            f"that budget. Raise `{field}` well above {needed:.3g} (e.g. 10x), or raise the budget."
        )
    return rest**-0.5


def checked_factors(algorithm: DPAlgorithm, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
    """The algorithm's factors, refused unless every weighted norm is within its sensitivity."""
    factors = algorithm.clip_factors(norms, groups)
    if factors.shape != norms.shape:
        raise SensitivityError(f"{algorithm.name}: {factors.shape[0]} clip factors for {norms.shape[0]} units")
    weighted = factors.double() * norms.double()
    if len(norms) and (
        not torch.isfinite(factors).all() or (factors < 0).any() or weighted.max() > algorithm.sensitivity * (1 + 1e-5)
    ):
        raise SensitivityError(
            f"{algorithm.name}: a unit's weighted gradient norm {float(weighted.max()):.6g} exceeds the sensitivity "
            f"{algorithm.sensitivity:.6g}; nothing of this step is released."
        )
    return factors


ALGORITHMS: dict[str, type[DPAlgorithm]] = {"dpsgd": DPAlgorithm}


def register_algorithm(name: str, cls: type[DPAlgorithm]) -> None:
    """Registers a DP algorithm under ``name`` (refuses to silently replace a different class)."""
    if ALGORITHMS.get(name, cls) is not cls:
        raise ValueError(f"algorithm name {name!r} is already registered to {ALGORITHMS[name].__name__}")
    ALGORITHMS[name] = cls


def make_algorithm(name: str, **kwargs: Any) -> DPAlgorithm:
    """An instance of the algorithm registered as ``name``; ``kwargs``: the base arguments and its hyper-parameters."""
    if name not in ALGORITHMS:
        raise ValueError(f"`algorithm` must be one of {', '.join(sorted(ALGORITHMS))}; got {name!r}")
    return ALGORITHMS[name](**kwargs)


__all__ = [
    "ALGORITHMS",
    "DPAlgorithm",
    "SensitivityError",
    "build_algorithm",
    "checked_factors",
    "make_algorithm",
    "register_algorithm",
    "split_noise",
]

from dplit.privacy import mitigations as _mitigations  # noqa: E402,F401  (registers the mitigation algorithms)
