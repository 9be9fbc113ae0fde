"""Build the private training pieces from one validated config: per-sample-gradient hooks, DP optimizer, sampler.

The sample rate computed here is the one the loader samples with and the one the accountant is given
(invariant 1). Nothing here knows about Lightning: the callback adapts it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from opacus.data_loader import DPDataLoader
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.batch_memory_manager import BatchSplittingSampler
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, RandomSampler

from dplit.privacy.bookkeeping import BookKeeping
from dplit.privacy.config import PrivacyConfig
from dplit.privacy.grad_samplers import keep_for_dp

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


def attach_hooks(module: nn.Module, config: PrivacyConfig):
    """Attach per-sample-gradient hooks to ``module`` in place (it keeps its own forward; Lightning trains it).

    Returns the Opacus hooks object; keep it alive for as long as training runs, and call ``remove_hooks()``.
    """
    keep_for_dp(module)  # LSTMScan layers keep their gate gradients for the per-example rules
    if config.grad_sample_mode == "bookkeeping":
        return BookKeeping(module, config.max_grad_norm)
    kwargs: dict = {"batch_first": True, "loss_reduction": "mean", "strict": True}
    if config.grad_sample_mode == "ghost":
        kwargs["max_grad_norm"] = config.max_grad_norm
    return prepare_module(module, grad_sample_mode=config.grad_sample_mode, wrap_model=False, **kwargs)


def make_optimizer(
    optimizer: torch.optim.Optimizer,
    config: PrivacyConfig,
    *,
    noise_multiplier: float,
    plan: SamplingPlan,
    world_size: int = 1,
    generator: torch.Generator | None = None,
) -> DPOptimizer:
    """Wrap an ordinary optimizer (SGD -> DP-SGD, Adam -> DP-Adam, ...): clip, add noise once, average.

    Under DDP the global expected batch B is split over ranks; each rank divides by B / world_size and Opacus'
    distributed optimizer adds noise on rank 0 only before the all-reduce, so the update is
    (sum of clipped grads + N(0, sigma^2 C^2)) / B, as in the single-process run.
    """
    if isinstance(optimizer, DPOptimizer):
        raise PrivacyEngineError("The optimizer is already a DP optimizer; do not wrap it twice.")
    distributed = world_size > 1
    # book-keeping writes the clipped sum into p.grad, as ghost clipping's second backward does
    mode = "ghost" if config.grad_sample_mode == "bookkeeping" else config.grad_sample_mode
    cls = get_optimizer_class(clipping=config.clipping, distributed=distributed, grad_sample_mode=mode)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    max_grad_norm: float | list[float] = config.max_grad_norm
    if config.clipping == "per_layer":
        # C_i = C / sqrt(k) for k parameter tensors: the whole-gradient norm stays <= C.
        max_grad_norm = [config.max_grad_norm / math.sqrt(len(params))] * len(params)
    return cls(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=plan.batch_size / world_size,
        loss_reduction="mean",
        generator=None if config.secure_mode else generator,
        secure_mode=config.secure_mode,
    )


def make_criterion(criterion: nn.Module, hooks, optimizer: DPOptimizer) -> DPLossFastGradientClipping:
    """Ghost clipping: wrap the task's loss so that ``loss.backward()`` runs the two backward passes."""
    return DPLossFastGradientClipping(hooks, optimizer, criterion, loss_reduction="mean")


def make_loader(
    loader: DataLoader,
    config: PrivacyConfig,
    *,
    plan: SamplingPlan,
    optimizer: DPOptimizer,
    world_size: int = 1,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """Replace the sampling of the task's train loader.

    Poisson: each example joins each batch independently with probability q = B/N (the accountant's q), for
    ceil(N/B) steps an epoch; empty batches are passed through. Otherwise a shuffled fixed-size loader with our
    generator (the accountant then reports the no-amplification bound). ``max_physical_batch_size`` splits each
    logical batch into physical ones; the optimizer steps (and the accountant counts) once per logical batch.
    """
    if config.poisson_sampling:
        new: DataLoader = DPDataLoader(
            loader.dataset,
            sample_rate=plan.sample_rate,
            collate_fn=loader.collate_fn,
            generator=generator,
            distributed=world_size > 1,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
            persistent_workers=loader.persistent_workers,
        )
        # Opacus' default is int(1/q) steps; use ceil(N/B) so a DP epoch has as many steps as a non-DP one.
        new.batch_sampler.steps = plan.steps_per_epoch  # type: ignore[union-attr]
        if world_size > 1:
            new.batch_sampler.num_batches = plan.steps_per_epoch  # type: ignore[union-attr]
    else:
        if world_size > 1:
            raise PrivacyEngineError("`poisson_sampling: false` is not supported under DDP; use Poisson sampling.")
        new = DataLoader(
            loader.dataset,
            batch_size=plan.batch_size,
            sampler=RandomSampler(loader.dataset, generator=generator),  # type: ignore[arg-type]
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            worker_init_fn=loader.worker_init_fn,
            persistent_workers=loader.persistent_workers,
        )
    if config.max_physical_batch_size is not None:
        new = DataLoader(
            new.dataset,
            batch_sampler=_UnsizedSplittingSampler(
                sampler=new.batch_sampler,  # type: ignore[arg-type]
                max_batch_size=config.max_physical_batch_size,
                optimizer=optimizer,
            ),
            collate_fn=new.collate_fn,
            num_workers=new.num_workers,
            pin_memory=new.pin_memory,
            worker_init_fn=new.worker_init_fn,
            persistent_workers=new.persistent_workers,
            generator=generator,  # iter() draws its worker base seed from it, as the unsplit loader does
        )
    return new


class _UnsizedSplittingSampler(BatchSplittingSampler):
    """Opacus' splitting sampler without ``__len__``.

    The number of physical batches in a Poisson epoch is random. Opacus' estimate of it would make Lightning end
    the epoch after that many batches, possibly inside a logical batch whose clipped gradients would then leak
    into the next step. Without a length, Lightning runs the sampler to exhaustion.
    """

    def __len__(self) -> int:
        raise TypeError("the number of physical batches of a Poisson epoch is random")


@torch.no_grad()
def per_sample_grad_norms(hooks, optimizer: DPOptimizer, grad_sample_mode: str) -> torch.Tensor | None:
    """Pre-clipping per-example gradient norms [B] of the current physical batch, or None if not available.

    Read-only diagnostics: these are NOT differentially private (they are computed from raw training data).
    """
    if grad_sample_mode == "bookkeeping":
        return hooks.last_norms
    if grad_sample_mode == "ghost":
        norms = getattr(hooks, "_per_sample_gradient_norms", None)
        return None if norms is None else norms.detach()
    grads: list[torch.Tensor] = []
    for p in optimizer.params:
        g = getattr(p, "grad_sample", None)
        if not isinstance(g, torch.Tensor):
            return None
        grads.append(g)
    if not grads:
        return None
    # each g: [B, *param.shape]; the per-example norm is taken over all parameters jointly
    return torch.stack([g.flatten(1).norm(dim=1) for g in grads], dim=1).norm(dim=1)


__all__ = [
    "PrivacyEngineError",
    "SamplingPlan",
    "attach_hooks",
    "make_criterion",
    "make_loader",
    "make_optimizer",
    "per_sample_grad_norms",
    "plan_sampling",
]
