"""Build the private training pieces from one validated config: the DP optimizer and the private train loader.

The sample rate computed here is the one the loader samples with and the one the accountant is given
(invariant 1). Nothing here knows about Lightning: the callback adapts it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from opacus.data_loader import dtype_safe, shape_safe, wrap_collate_with_empty
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.uniform_sampler import DistributedUniformWithReplacementSampler, UniformWithReplacementSampler
from torch.utils.data import DataLoader, IterableDataset

from dplit.privacy.backends import PerSampleBackend
from dplit.privacy.config import PrivacyConfig
from dplit.privacy.rng import entropy_seed
from dplit.privacy.stepping import (
    BatchTrace,
    ShuffledBatches,
    StepController,
    TrackedBatches,
    controlled_optimizer_class,
)

# Opacus' backward hooks fire on module outputs when the input needs no grad (always, for a first layer): harmless.
warnings.filterwarnings("ignore", message=r"Full backward hook is firing when gradients are computed with respect")


class PrivacyEngineError(ValueError):
    """The training setup cannot be made private as configured."""


@dataclass(frozen=True)
class SamplingPlan:
    """How the training set is sampled: the numbers the accountant is given."""

    dataset_size: int
    """N, examples in the (global) training set."""
    batch_size: int
    """Expected logical batch size B (global, across all devices)."""
    steps_per_epoch: int
    """Logical steps per epoch: ceil(N / B)."""

    @property
    def sample_rate(self) -> float:
        """Poisson sampling probability q = B / N."""
        return self.batch_size / self.dataset_size


def plan_sampling(loader: DataLoader) -> SamplingPlan:
    """Read N and B off the task's ordinary train loader (its ``batch_size`` is the expected logical batch)."""
    if isinstance(loader.dataset, IterableDataset):
        raise PrivacyEngineError(
            "The train loader is over an IterableDataset; Poisson sampling needs a map-style dataset with len()."
        )
    if loader.batch_size is None:
        raise PrivacyEngineError(
            "The train loader has no `batch_size` (it uses a custom batch_sampler). DP needs the expected batch "
            "size to set the sampling rate: build the train DataLoader with `batch_size=B`."
        )
    n = len(loader.dataset)  # type: ignore[arg-type]
    b = int(loader.batch_size)
    if n == 0:
        raise PrivacyEngineError("The training set is empty.")
    if b > n:
        raise PrivacyEngineError(f"`batch_size` ({b}) is larger than the training set ({n} examples).")
    return SamplingPlan(dataset_size=n, batch_size=b, steps_per_epoch=math.ceil(n / b))


def make_optimizer(
    optimizer: torch.optim.Optimizer,
    config: PrivacyConfig,
    *,
    noise_multiplier: float,
    plan: SamplingPlan,
    backend: PerSampleBackend,
    controller: StepController,
    world_size: int = 1,
    generator: torch.Generator | None = None,
) -> DPOptimizer:
    """Wrap an ordinary optimizer (SGD -> DP-SGD, Adam -> DP-Adam, ...): clip, add noise once, average.

    The optimizer asks ``controller`` before every step whether to accumulate, release (noise once, step, account)
    or refuse. Under DDP the global expected batch B is split over ranks; each rank divides by B / world_size and
    Opacus' distributed optimizer adds noise on rank 0 only before the all-reduce, so the update is
    (sum of clipped grads + N(0, sigma^2 C^2)) / B, as in the single-process run.
    """
    if isinstance(optimizer, DPOptimizer):
        raise PrivacyEngineError("The optimizer is already a DP optimizer; do not wrap it twice.")
    base = get_optimizer_class(
        clipping=config.clipping, distributed=world_size > 1, grad_sample_mode=backend.optimizer_family
    )
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    max_grad_norm: float | list[float] = config.max_grad_norm
    if config.clipping == "per_layer":
        # C_i = C / sqrt(k) for k parameter tensors: the whole-gradient norm stays <= C.
        max_grad_norm = [config.max_grad_norm / math.sqrt(len(params))] * len(params)
    dp = controlled_optimizer_class(base)(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=plan.batch_size / world_size,
        loss_reduction="mean",
        generator=None if config.secure_mode else generator,
        secure_mode=config.secure_mode,
    )
    dp.dplit_controller = controller
    return dp


def local_gradients(module: Any) -> bool:
    """Turn off DDP's own gradient all-reduce on a ``DistributedDataParallel`` module; True if it was one.

    Under DP each rank clips its own examples' gradients, and the DP optimizer (Opacus' distributed family) sums the
    clipped sums across ranks, with the noise added once on rank 0, overwriting whatever DDP's reducer averaged.
    That reducer's all-reduce is therefore pure overhead: one full-gradient all-reduce per backward (two per step
    under ghost clipping). The results are the same either way (``tests/test_ddp_privacy.py`` checks the update
    against the single-process update on the union batch for every backend); only the communication is saved.
    Parameters still start equal on every rank (DDP's broadcast at wrap time) and stay equal because every rank
    applies the same all-reduced noisy update.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(module, DistributedDataParallel):
        return False
    module.require_backward_grad_sync = False
    return True


def make_loader(
    loader: DataLoader,
    config: PrivacyConfig,
    *,
    plan: SamplingPlan,
    trace: BatchTrace,
    world_size: int = 1,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Replace the sampling of the task's train loader.

    Poisson: each example joins each batch independently with probability q = B/N (the accountant's q), for
    ceil(N/B) steps an epoch; empty batches are passed through. Otherwise a fresh random permutation cut into
    fixed-size batches each pass (the accountant then counts one Gaussian mechanism per pass). Every physical batch
    is recorded in ``trace`` (see :mod:`dplit.privacy.stepping`); ``max_physical_batch_size`` splits each logical
    batch into physical ones, and the optimizer steps (and the accountant counts) once per logical batch.

    Workers (``num_workers > 0``, ``persistent_workers``, ``pin_memory``) only load the examples of the indices the
    batch sampler yields; the sampler itself runs in the training process, so the draws are the same with or without
    workers. The DataLoader's own ``generator`` (from which each ``iter()`` draws the workers' base seed) is a separate
    one seeded from OS entropy: the secret sampling stream is neither consumed by nor revealed through worker seeds
    (``tests/test_dataloading.py``).
    """
    dataset = loader.dataset
    n = len(dataset)  # type: ignore[arg-type]
    logical: Any
    if config.poisson_sampling:
        if world_size > 1:
            logical = DistributedUniformWithReplacementSampler(
                total_size=n, sample_rate=plan.sample_rate, steps=plan.steps_per_epoch, generator=generator
            )
        else:
            logical = UniformWithReplacementSampler(
                num_samples=n, sample_rate=plan.sample_rate, steps=plan.steps_per_epoch, generator=generator
            )
        first = dataset[0]
        collate = wrap_collate_with_empty(  # an empty Poisson batch becomes zero-length tensors of the right shapes
            collate_fn=loader.collate_fn,
            batch_first=True,
            rand_on_empty=False,
            sample_empty_shapes=[(0, *shape_safe(x)) for x in first],
            dtypes=[dtype_safe(x) for x in first],
        )
    else:
        if world_size > 1:
            raise PrivacyEngineError("`poisson_sampling: false` is not supported under DDP; use Poisson sampling.")
        if generator is None:
            raise PrivacyEngineError("shuffled batches need a (secret) generator")
        logical = ShuffledBatches(n, plan.batch_size, generator)
        collate = loader.collate_fn
    batches = TrackedBatches(logical, trace, config.max_physical_batch_size, passes=not config.poisson_sampling)
    return DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn,
        persistent_workers=loader.persistent_workers,
        generator=torch.Generator().manual_seed(entropy_seed()),  # worker base seeds: not the sampling stream
    )


__all__ = ["PrivacyEngineError", "SamplingPlan", "local_gradients", "make_loader", "make_optimizer", "plan_sampling"]
