"""Mitigations of DP-SGD's disparate impact, as registered DP algorithms (see ``dplit.privacy.algorithms``).

* ``dpsgd_f`` (Xu, Du, Wu 2021): per-group clip bounds ``C_k = C0 (1 + b_k / mean_j b_j)``, where ``b_k`` is the
  privately estimated fraction of group k's examples whose gradient norm exceeds ``C0`` (noisy counts of clipped
  and unclipped examples per group); the gradient noise scales with ``max_k C_k``.
* ``global_adapt`` (DPSGD-Global-Adapt, Esipova et al. 2023): an upper threshold ``Z >= C``; a gradient with norm at
  most ``Z`` is scaled by ``C / Z`` (directions of the small gradients are kept relative to each other), a larger one
  is clipped to ``C``: factor ``C / max(||g||, Z)``. ``Z`` tracks a quantile of the norms privately.
* ``adaptive_clipping`` (Andrew et al. 2021 quantile clipping, bounded below as Zhao et al. 2025): the clip bound
  follows a target quantile of the norms, ``C <- clamp(C exp(-eta (b - gamma)), min_clip, max_clip)`` with ``b`` the
  noisy fraction of unclipped examples.
* ``automatic_clipping`` (Bu et al. 2022, AUTO-S): per-example normalisation ``C g / (||g|| + stability)``.

Statistics are counted over the whole logical batch (all its physical batches) and released with the step's noise;
the released values set the clip rule of the *next* step (as Andrew et al.; DPSGD-F's reference code uses the
current batch, which does not work with virtual steps). Each statistic's L2 sensitivity under adding or removing one
unit: 1 for DPSGD-F's count vector (a unit is counted once, as clipped or unclipped in its group), 1/2 for the
centred counts ``sum_i (1[||g_i|| <= T] - 1/2)`` of the two quantile rules (Andrew et al.). The noise of the
statistics is part of the step's joint Gaussian mechanism (``split_noise``), so every algorithm spends exactly
DP-SGD's events at the same ``noise_multiplier``. Under DDP each rank counts its shard; the counts are summed across
ranks, rank 0 adds the noise once, and the noisy counts are broadcast so that every rank applies the same rule.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from opacus.optimizers.optimizer import _generate_noise

from dplit.privacy.algorithms import DPAlgorithm, register_algorithm, split_noise
from dplit.privacy.config import PrivacyConfigError


def _positive(name: str, value: float) -> float:
    if not (value > 0 and math.isfinite(value)):
        raise PrivacyConfigError(f"`{name}` must be a positive number, got {value}.")
    return float(value)


class CountingAlgorithm(DPAlgorithm):
    """Base of the algorithms that release one noisy count vector per step (std ``count_noise`` per entry).

    Args:
        count_noise: std of the Gaussian noise on each released count (the reference implementations' 10).
    """

    count_sensitivity: ClassVar[float] = 1.0
    """L2 sensitivity of the count vector to adding or removing one unit."""

    def __init__(self, *args: Any, count_noise: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.count_noise = _positive("count_noise", 10.0 if count_noise is None else count_noise)
        self._gradient_sigma = split_noise(
            self.noise_multiplier, [self.count_noise / self.count_sensitivity], "count_noise"
        )
        self._pending = torch.zeros(self.count_size(), dtype=torch.float64)
        self.last_release: torch.Tensor | None = None
        """The last released (noisy) count vector."""

    @property
    def gradient_noise_multiplier(self) -> float:
        return self._gradient_sigma

    @property
    def expected_batch_size(self) -> float:
        """q N: the expected number of units in a logical batch (the public normaliser of the counts)."""
        if self.dataset_size < 1:
            raise PrivacyConfigError(f"{self.name}: the dataset size is needed to normalise its noisy counts.")
        return self.sample_rate * self.dataset_size

    def count_size(self) -> int:
        raise NotImplementedError

    def counts(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        """This physical batch's count vector ``[count_size]`` (float64) for pre-clipping unit norms."""
        raise NotImplementedError

    def update(self, noisy: torch.Tensor) -> dict[str, float]:
        """Set the next step's clip rule from the released counts; returns metrics to log."""
        raise NotImplementedError

    def observe(self, norms: torch.Tensor, groups: torch.Tensor | None) -> None:
        self._pending += self.counts(norms.detach().double().cpu(), None if groups is None else groups.cpu())

    def discard(self) -> None:
        self._pending.zero_()

    def on_release(self) -> dict[str, float]:
        counts, world = self._pending, _world()
        if world is not None:  # DDP: the logical batch is the union of the ranks' shards
            counts = _all_reduce(counts, world)
        noisy = counts
        if world is None or world.get_rank() == 0:  # the noise once, on rank 0, then the same value everywhere
            noise = _generate_noise(
                std=self.count_noise, reference=counts, generator=self.generator, secure_mode=self.secure_mode
            )
            noisy = counts + noise.to(counts.dtype)
        if world is not None:
            noisy = _broadcast(noisy, world)
        self._pending = torch.zeros_like(self._pending)
        self.last_release = noisy
        return self.update(noisy)


class DPSGDF(CountingAlgorithm):
    """DPSGD-F: per-group clip bounds from noisy per-group counts of clipped examples (Xu et al. 2021)."""

    name = "dpsgd_f"
    hyperparameters = ("count_noise",)
    requires_groups = True
    count_sensitivity = 1.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.num_groups < 1:
            raise PrivacyConfigError("`algorithm: dpsgd_f` needs the DataModule's `group_names` (one bound a group).")
        # no estimate yet: all b_k equal, so C_k = C0 (1 + 1)
        self.bounds = torch.full((self.num_groups,), 2.0 * self.max_grad_norm, dtype=torch.float64)

    @property
    def sensitivity(self) -> float:
        return float(self.bounds.max())

    def count_size(self) -> int:
        return 2 * self.num_groups

    def _ids(self, groups: torch.Tensor | None, units: int) -> torch.Tensor:
        if groups is None or len(groups) != units:
            raise RuntimeError(
                "`algorithm: dpsgd_f` clips each example by its group's bound, but this batch carries no group ids "
                "(batches must be (x, y, group) with one id per example)."
            )
        bad = groups[(groups < 0) | (groups >= self.num_groups)]
        if len(bad):
            raise RuntimeError(
                f"`algorithm: dpsgd_f`: group id {int(bad[0])} is outside the DataModule's {self.num_groups} "
                f"`group_names` (ids 0..{self.num_groups - 1}); fix the DataModule's group ids or its `group_names`."
            )
        return groups.long()

    def counts(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        ids = self._ids(groups, len(norms))
        clipped = norms > self.max_grad_norm
        k = self.num_groups
        m = torch.bincount(ids[clipped], minlength=k)  # clipped at C0, per group
        o = torch.bincount(ids[~clipped], minlength=k)  # not clipped
        return torch.cat([m, o]).double()

    def clip_factors(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        ids = self._ids(groups, len(norms)).to(norms.device)
        bound = self.bounds.to(device=norms.device, dtype=norms.dtype)[ids]
        return (bound / (norms + 1e-6)).clamp(max=1.0)

    def update(self, noisy: torch.Tensor) -> dict[str, float]:
        k = self.num_groups
        m, o = noisy[:k].clamp(min=0), noisy[k:].clamp(min=0)
        total = m + o
        b = torch.where(total > 0, m / total.clamp(min=1e-12), torch.ones_like(m))  # no estimate: as if all clipped
        self.bounds = self.max_grad_norm * (1 + b / (b.mean() + 1e-8))
        return {f"clip_bound_g{i}": float(c) for i, c in enumerate(self.bounds)}

    def state_dict(self) -> dict[str, Any]:
        return {"bounds": self.bounds.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "bounds" in state and len(state["bounds"]) == self.num_groups:
            self.bounds = torch.tensor(state["bounds"], dtype=torch.float64)


class GlobalAdapt(CountingAlgorithm):
    """DPSGD-Global-Adapt (Esipova et al. 2023): factor ``C / max(||g||, Z)``, ``Z`` adapted to a norm quantile.

    Args:
        global_threshold: the initial upper threshold Z (reference code: 100); kept >= ``max_grad_norm``.
        target_quantile: fraction of units whose norm ``Z`` should exceed (reference: 0.9, i.e. 10% above Z).
        adapt_lr: step of the geometric update ``Z <- Z exp(-adapt_lr (b - target_quantile))`` (reference: 1).
    """

    name = "global_adapt"
    hyperparameters = ("count_noise", "global_threshold", "target_quantile", "adapt_lr")
    count_sensitivity = 0.5

    def __init__(
        self,
        *args: Any,
        global_threshold: float | None = None,
        target_quantile: float | None = None,
        adapt_lr: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.threshold = max(self.max_grad_norm, _positive("global_threshold", global_threshold or 100.0))
        self.target_quantile = _quantile(0.9 if target_quantile is None else target_quantile)
        self.adapt_lr = _positive("adapt_lr", 1.0 if adapt_lr is None else adapt_lr)
        _ = self.expected_batch_size

    def count_size(self) -> int:
        return 1

    def counts(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        return ((norms <= self.threshold).double() - 0.5).sum().reshape(1)

    def clip_factors(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        return self.max_grad_norm / norms.clamp(min=self.threshold)

    def update(self, noisy: torch.Tensor) -> dict[str, float]:
        below = float(noisy[0]) / self.expected_batch_size + 0.5
        step = math.exp(-self.adapt_lr * (below - self.target_quantile))
        self.threshold = max(self.max_grad_norm, self.threshold * step)
        return {"global_threshold": self.threshold}

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.threshold = float(state.get("threshold", self.threshold))


class AdaptiveClipping(CountingAlgorithm):
    """Quantile clipping (Andrew et al. 2021) with bounds on the clip bound (Zhao et al. 2025's lower bound).

    Args:
        target_quantile: fraction of units to leave unclipped (Andrew et al.: 0.5).
        adapt_lr: step of ``C <- C exp(-adapt_lr (b - target_quantile))`` (Andrew et al.: 0.2).
        min_clip: lower bound on C (default: ``max_grad_norm``, the initial bound: C never falls below the constant
            clipping it replaces, so rare groups' large gradients are never clipped harder than by DP-SGD).
        max_clip: upper bound on C (default: none).
    """

    name = "adaptive_clipping"
    hyperparameters = ("count_noise", "target_quantile", "adapt_lr", "min_clip", "max_clip")
    count_sensitivity = 0.5

    def __init__(
        self,
        *args: Any,
        target_quantile: float | None = None,
        adapt_lr: float | None = None,
        min_clip: float | None = None,
        max_clip: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.target_quantile = _quantile(0.5 if target_quantile is None else target_quantile)
        self.adapt_lr = _positive("adapt_lr", 0.2 if adapt_lr is None else adapt_lr)
        self.min_clip = _positive("min_clip", self.max_grad_norm if min_clip is None else min_clip)
        self.max_clip = math.inf if max_clip is None else _positive("max_clip", max_clip)
        if self.min_clip > self.max_clip:
            raise PrivacyConfigError(f"`min_clip` ({self.min_clip}) must not exceed `max_clip` ({self.max_clip}).")
        self.clip = min(max(self.max_grad_norm, self.min_clip), self.max_clip)
        _ = self.expected_batch_size

    @property
    def sensitivity(self) -> float:
        return self.clip

    def count_size(self) -> int:
        return 1

    def counts(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        return ((norms <= self.clip).double() - 0.5).sum().reshape(1)

    def clip_factors(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        return (self.clip / (norms + 1e-6)).clamp(max=1.0)

    def update(self, noisy: torch.Tensor) -> dict[str, float]:
        unclipped = float(noisy[0]) / self.expected_batch_size + 0.5
        self.clip = self.clip * math.exp(-self.adapt_lr * (unclipped - self.target_quantile))
        self.clip = min(max(self.clip, self.min_clip), self.max_clip)
        return {"clip_bound": self.clip, "unclipped_fraction": unclipped}

    def state_dict(self) -> dict[str, Any]:
        return {"clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clip = float(state.get("clip", self.clip))


class AutomaticClipping(DPAlgorithm):
    """Automatic clipping (Bu et al. 2022, AUTO-S): every gradient normalised, ``C g / (||g|| + stability)``.

    Args:
        stability: the small constant gamma that keeps tiny gradients from being blown up (Bu et al.: 0.01).
    """

    name = "automatic_clipping"
    hyperparameters = ("stability",)

    def __init__(self, *args: Any, stability: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stability = _positive("stability", 0.01 if stability is None else stability)

    def clip_factors(self, norms: torch.Tensor, groups: torch.Tensor | None) -> torch.Tensor:
        return self.max_grad_norm / (norms + self.stability)


def _world() -> Any:
    """``torch.distributed`` when a process group of several ranks is running (DDP), else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist
    return None


def _comm_device(dist: Any) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(counts: torch.Tensor, dist: Any) -> torch.Tensor:
    total = counts.to(_comm_device(dist)).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.cpu()


def _broadcast(values: torch.Tensor, dist: Any) -> torch.Tensor:
    shared = values.to(_comm_device(dist)).clone()
    dist.broadcast(shared, src=0)
    return shared.cpu()


def _quantile(value: float) -> float:
    if not 0 < value < 1:
        raise PrivacyConfigError(f"`target_quantile` must be in (0, 1), got {value}.")
    return float(value)


for _cls in (DPSGDF, GlobalAdapt, AdaptiveClipping, AutomaticClipping):
    register_algorithm(_cls.name, _cls)

__all__ = ["AdaptiveClipping", "AutomaticClipping", "CountingAlgorithm", "DPSGDF", "GlobalAdapt"]
