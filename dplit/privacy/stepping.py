"""What runs is what is accounted: logical batches, passes, the budget guard and the accountant, per optimizer step.

Three pieces, all owned by dplit (no Opacus internals):

* the **batch samplers** (:class:`TrackedBatches` over Poisson or shuffled fixed-size batches) split each logical
  batch into physical ones (virtual steps) and, as they yield, append to a :class:`BatchTrace` whether each
  physical batch closes its logical batch and which pass over the data it belongs to;
* the callback pops that record at every ``on_train_batch_start`` (Lightning consumes batches in loader order, so
  the oldest record is the current batch's);
* :class:`StepController`, consulted by the DP optimizer's ``pre_step`` (see :func:`controlled_optimizer_class`),
  decides for each physical batch: accumulate (not the last of its logical batch), release (clip, noise, step,
  record the step's privacy events in the accountant: exactly once per noised step), or refuse (the release
  would exceed the budget: nothing is noised, stepped or accounted).

A logical batch cut by the end of an epoch (``limit_train_batches``) never reaches a release: its accumulated
clipped gradients are discarded at the next epoch start, so it is neither used nor accounted.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from opacus.optimizers import DPOptimizerFastGradientClipping, DPPerLayerOptimizer, SimpleDistributedPerLayerOptimizer
from torch.utils.data import Sampler

from dplit.privacy.accounting import Event, PrivacyAccountant
from dplit.privacy.algorithms import DPAlgorithm, checked_factors
from dplit.privacy.precision import widen


class BatchTrace:
    """FIFO of ``(closes_logical_batch, pass_id)`` for the physical batches yielded and not yet consumed."""

    def __init__(self) -> None:
        self._queue: deque[tuple[bool, int | None]] = deque()
        self.passes = 0
        """Passes over the data started so far (non-Poisson sampling)."""

    def new_iteration(self) -> None:
        """A new loader iteration: the records of an abandoned one (prefetched batches) no longer apply."""
        self._queue.clear()

    def push(self, closes: bool, pass_id: int | None) -> None:
        self._queue.append((closes, pass_id))

    def pop(self) -> tuple[bool, int | None]:
        if not self._queue:
            raise RuntimeError(
                "DifferentialPrivacy: a training batch did not come from the private loader's sampler, so its "
                "sampling cannot be matched with the accountant."
            )
        return self._queue.popleft()


class ShuffledBatches(Sampler[list[int]]):
    """Fixed-size batches of a fresh random permutation per iteration; each iteration is one pass over the data."""

    def __init__(self, num_examples: int, batch_size: int, generator: torch.Generator) -> None:
        self.num_examples, self.batch_size, self.generator = num_examples, batch_size, generator

    def __len__(self) -> int:
        return math.ceil(self.num_examples / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_examples, generator=self.generator).tolist()
        for start in range(0, self.num_examples, self.batch_size):
            yield order[start : start + self.batch_size]


class TrackedBatches(Sampler[list[int]]):
    """Wraps a logical batch sampler: splits batches into physical ones and records each in a :class:`BatchTrace`.

    Args:
        logical: yields logical batches (Poisson draws, or :class:`ShuffledBatches`).
        trace: where each physical batch's record goes.
        max_physical_batch_size: split size (None: no split).
        passes: True when each iteration of ``logical`` is a pass over the data (non-Poisson sampling).
    """

    def __init__(
        self, logical: Any, trace: BatchTrace, max_physical_batch_size: int | None = None, passes: bool = False
    ) -> None:
        self.logical, self.trace, self.max_physical, self.passes = logical, trace, max_physical_batch_size, passes

    def __len__(self) -> int:
        if self.max_physical is not None:
            # The number of physical batches of a Poisson epoch is random: with a length, Lightning could end the
            # epoch inside a logical batch; without one it runs the sampler to exhaustion.
            raise TypeError("the number of physical batches of a split epoch is random")
        return len(self.logical)

    def __iter__(self) -> Iterator[list[int]]:
        self.trace.new_iteration()
        pass_id: int | None = None
        for batch in self.logical:
            if self.passes and pass_id is None:
                self.trace.passes += 1
                pass_id = self.trace.passes
            indices = list(batch)
            size = self.max_physical or max(1, len(indices))
            chunks = [indices[i : i + size] for i in range(0, len(indices), size)] or [[]]
            for k, chunk in enumerate(chunks):
                self.trace.push(k == len(chunks) - 1, pass_id)
                yield chunk


class StepController:
    """Per physical batch: accumulate, release (and account) or refuse; see the module docstring.

    Args:
        accountant: composes the events of every released step.
        algorithm: weights each unit's gradient and declares the events a released step spends (Poisson sampling).
        pass_events: the events a non-Poisson pass spends, recorded with the first release of each pass (None
            under Poisson sampling).
        budget: epsilon not to exceed (None: no budget).
        delta: the delta of the budget.
        step_limit: precomputed total logical steps within the budget (Poisson; None to check each release).
        on_release: called after each release is accounted (ledger write).
    """

    def __init__(
        self,
        accountant: PrivacyAccountant,
        algorithm: DPAlgorithm,
        pass_events: list[Event] | None,
        budget: float | None,
        delta: float,
        step_limit: int | None,
        on_release: Callable[[], None] | None = None,
    ) -> None:
        self.accountant, self.algorithm, self.pass_events = accountant, algorithm, pass_events
        self.events = algorithm.events()
        self.budget, self.delta, self.step_limit, self.on_release = budget, delta, step_limit, on_release
        self.current: tuple[bool, int | None] | None = None
        self.stepped = False
        self.pending = False
        """A logical batch has accumulated clipped gradients that were not released yet."""
        self.exhausted = False
        """A release was refused because it would exceed the budget."""
        self._accounted_pass: int | None = None
        self.groups: torch.Tensor | None = None
        """Group ids ``[units]`` of the current physical batch (None when the batch carries none)."""
        self.released_metrics: dict[str, float] = {}
        self.empty = False
        """The current physical batch has no rows (Poisson): no per-sample work, the release adds the noise only."""

    def begin_batch(self, record: tuple[bool, int | None], batch: Any = None) -> None:
        self.current, self.stepped = record, False
        first = batch[0] if isinstance(batch, list | tuple) and batch else batch
        self.empty = isinstance(first, torch.Tensor) and first.dim() > 0 and first.shape[0] == 0
        group = batch[2] if isinstance(batch, list | tuple) and len(batch) >= 3 else None
        if isinstance(group, torch.Tensor) and group.dim() == 2:
            group = group[:, 0]  # several group attributes: the primary one (column 0)
        self.groups = group if isinstance(group, torch.Tensor) and group.dim() == 1 else None

    def rows_per_unit(self, rows: int) -> int:
        """K rows of the physical batch per privacy unit (per dataset item), from the group ids' length.

        A dataset item is the unit of privacy: a task that turns each item into K rows (augmented views, a sentence
        and its counterfactual) must lay them out unit-major (item 0's K rows, then item 1's, ...).
        """
        if self.groups is None or len(self.groups) in (0, rows):
            return 1
        units = len(self.groups)
        if rows % units:
            raise RuntimeError(
                f"DifferentialPrivacy: {rows} gradient rows for {units} dataset items; a privacy unit's rows must be "
                "K consecutive rows (unit-major layout) so that they are combined before clipping."
            )
        return rows // units

    def factors(self, norms: torch.Tensor) -> torch.Tensor:
        """The algorithm's per-unit factors for pre-clipping unit norms, checked against its sensitivity.

        Called exactly once per physical batch (by the optimizer or the backend's backward); the algorithm also
        counts the batch into the statistics it releases with the step.
        """
        groups = self.groups if self.groups is not None and len(self.groups) == len(norms) else None
        factors = checked_factors(self.algorithm, norms, groups)
        self.algorithm.observe(norms, groups)
        return factors

    def _step_events(self, pass_id: int | None) -> list[Event]:
        if self.pass_events is None:
            return self.events
        return self.pass_events if pass_id != self._accounted_pass else []

    def _within_budget(self, events: list[Event]) -> bool:
        if self.budget is None:
            return True
        if self.step_limit is not None:
            return self.accountant.steps < self.step_limit
        if not events:
            return True
        extra = [(sigma, q, 1) for sigma, q in events]
        return self.accountant.epsilon_with(extra, self.delta) <= self.budget

    def decide(self) -> str:
        """``accumulate``, ``release`` or ``refuse`` for the current physical batch (called once per step)."""
        if self.current is None:
            raise RuntimeError("DifferentialPrivacy: an optimizer step without a batch from the private loader.")
        if self.stepped:
            raise RuntimeError("DifferentialPrivacy: two optimizer steps for one batch (not supported under DP).")
        self.stepped = True
        closes, pass_id = self.current
        if self.exhausted or not self._within_budget(self._step_events(pass_id) if closes else []):
            self.exhausted = True
            self.algorithm.discard()  # nothing of this logical batch is released, its statistics included
            return "refuse"
        if not closes:
            self.pending = True
            return "accumulate"
        return "release"

    def released(self) -> None:
        """Account one released (noised) step: exactly once per noise draw."""
        assert self.current is not None
        events = self._step_events(self.current[1])
        self.accountant.record(events)
        self.released_metrics = self.algorithm.on_release()
        self.events = self.algorithm.events()
        if self.pass_events is not None:
            self._accounted_pass = self.current[1]
        self.pending = False
        if self.on_release is not None:
            self.on_release()


def controlled_optimizer_class(base: type) -> type:
    """``base`` (an Opacus DP optimizer class) whose ``pre_step`` asks a :class:`StepController` first."""

    class Controlled(base):  # type: ignore[misc, valid-type]
        dplit_controller: StepController | None = None

        def pre_step(self, closure: Any = None) -> bool:
            controller = self.dplit_controller
            if controller is None:
                raise RuntimeError("DifferentialPrivacy: the DP optimizer has no step controller.")
            decision = controller.decide()
            if decision == "refuse":
                return False  # nothing clipped, noised, stepped or accounted
            if decision == "accumulate":
                self.signal_skip_step(do_skip=True)  # consumed by this very pre_step: no queue outlives the call
            # the noise std is sigma_g times the sensitivity (sigma_g = sigma unless statistics share the budget)
            self.max_grad_norm = controller.algorithm.sensitivity
            self.noise_multiplier = controller.algorithm.gradient_noise_multiplier
            if controller.empty and not isinstance(self, DPOptimizerFastGradientClipping):
                for p in self.params:  # Opacus reads p.grad_sample first; the task need not run the model
                    if getattr(p, "grad_sample", None) is None:
                        p.grad_sample = p.new_zeros(0, *p.shape)
            if not super().pre_step(closure):
                return False
            controller.released()
            return True

        def clip_and_accumulate(self) -> None:
            """Per-unit norms (a unit's K rows averaged first, as De et al. 2022 average augmentation views), the
            algorithm's checked factors, their weighted sum. With the task's loss a mean over all rows, the non-DP
            gradient is the mean over units of these per-unit means, so DP and non-DP updates share one scale."""
            controller = self.dplit_controller
            assert controller is not None
            if controller.empty:  # an empty Poisson batch: nothing to clip (the task need not run the model)
                controller.factors(torch.zeros(0, device=self.params[0].device))
                for p in self.params:
                    p.summed_grad = torch.zeros_like(p) if p.summed_grad is None else p.summed_grad
                return
            if isinstance(self, DPPerLayerOptimizer | SimpleDistributedPerLayerOptimizer):
                return super().clip_and_accumulate()  # per-layer clipping: Opacus' own (DP-SGD, one row a unit)
            grads = [widen(g) for g in self.grad_samples]  # each [rows, *param.shape]; float32 under bf16-mixed
            rows = len(grads[0])
            k = controller.rows_per_unit(rows)
            if k > 1:  # a unit's gradient: the mean of its K rows' (each row's own loss gradient), then clipped
                grads = [g.reshape(rows // k, k, *g.shape[1:]).mean(1) for g in grads]
            if rows:
                norms = torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)
            else:
                norms = torch.zeros(0, device=grads[0].device)
            factors = controller.factors(norms)
            for p, g in zip(self.params, grads, strict=True):
                g = g.to(p.dtype)
                clipped = torch.einsum("i,i...", factors.to(device=g.device, dtype=p.dtype), g)
                p.summed_grad = clipped if p.summed_grad is None else p.summed_grad + clipped

    Controlled.__name__ = Controlled.__qualname__ = f"Controlled{base.__name__}"
    return Controlled


def discard_pending(optimizer: Any, controller: StepController) -> bool:
    """Drop clipped gradients accumulated for a logical batch that was cut (never released, never accounted)."""
    if not controller.pending:
        return False
    for p in optimizer.params:
        p.summed_grad = None
    controller.algorithm.discard()
    controller.pending = False
    return True


__all__ = [
    "BatchTrace",
    "ShuffledBatches",
    "StepController",
    "TrackedBatches",
    "controlled_optimizer_class",
    "discard_pending",
]
