"""Numerical precision under DP: which ``trainer.precision`` settings keep the sensitivity at C and the noise exact.

The DP guarantee needs every example's contribution to the summed gradient to have norm <= C, and Gaussian noise of
std sigma*C added to that sum. Under ``bf16-mixed`` the forward runs in bfloat16 (8-bit mantissa) but parameters,
gradients and optimizer state stay float32. What dplit does then:

* the per-example quantities the backends capture (activations and output gradients, Opacus' ``grad_sample``) are
  each a function of one example, even when rounded to bfloat16; they are widened to float32 (:func:`widen`) before
  anything else, and the per-example norms, the clip factors and the clipped sum are all computed in float32 from
  those same widened values, so the norm that is clipped is the norm of exactly what is summed;
* the noise is drawn and added in the parameters' dtype (float32) by the DP optimizer.

Refused, with the fix:

* ``16-mixed`` / ``16``: Lightning scales the loss by a dynamic ``GradScaler`` factor S before backward and skips
  steps whose gradients overflow. The per-example clipping would act on S-scaled gradients (an effective bound C/S)
  and a skipped step breaks the one-release-per-logical-batch accounting;
* ``*-true`` half precision (``bf16-true``, ``16-true``, ``transformer-engine``...): parameters, per-example norms,
  clipped sums and the noise itself would be half precision (norm errors ~0.4% make the sensitivity exceed C;
  bfloat16 rounding of the noisy sum is of the order of the noise for large batches);
* a backend whose clipped sum is formed by autograd in the autocast dtype (``ghost``: its second backward sums the
  reweighted per-example gradients in bfloat16, so rounding of the whole batch's sum, not of one example, enters
  the released gradient) unless it declares ``mixed_precision_safe``.
"""

from __future__ import annotations

import torch

from dplit.privacy.config import PrivacyConfigError

FULL_PRECISION = ("32-true", "32", "64-true", "64")
MIXED_PRECISION = ("bf16-mixed",)


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 if it is a half-precision float tensor (bfloat16/float16), else ``t`` itself."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def check_precision(precision: str, grad_sample_mode: str, mixed_precision_safe: bool) -> None:
    """Refuse a ``trainer.precision`` under which the clipping bound or the noise would not hold (see module doc).

    Args:
        precision: ``trainer.precision`` as Lightning normalises it (``"32-true"``, ``"bf16-mixed"``, ...).
        grad_sample_mode: the configured backend's name (for the message).
        mixed_precision_safe: the backend computes norms and clipped sums in float32 from per-example captures.
    """
    precision = str(precision)
    if precision in FULL_PRECISION:
        return
    if precision in MIXED_PRECISION:
        if not mixed_precision_safe:
            raise PrivacyConfigError(
                f"`trainer.precision: {precision}` with `grad_sample_mode: {grad_sample_mode}`: this backend forms the "
                "clipped gradient sum by autograd in bfloat16, so rounding of the whole batch's sum (not of one "
                "example) enters the released gradient and the sensitivity is no longer max_grad_norm. Use "
                "`grad_sample_mode: bookkeeping` or `hooks` (float32 norms and sums), or `trainer.precision: 32-true`."
            )
        return
    if precision in ("16-mixed", "16"):
        raise PrivacyConfigError(
            f"`trainer.precision: {precision}` is not supported with DifferentialPrivacy: float16 training scales the "
            "loss by a dynamic GradScaler factor before backward, so per-example clipping would act on scaled "
            "gradients (an effective bound max_grad_norm / scale), and the steps it skips on overflow break the "
            "privacy accounting. Use `trainer.precision: bf16-mixed` (no loss scaling; on GPUs with bfloat16 "
            "support, and on CPU) or `32-true`."
        )
    raise PrivacyConfigError(
        f"`trainer.precision: {precision}` is not supported with DifferentialPrivacy: with half-precision parameters "
        "the per-example norms, the clipped sum and the Gaussian noise would be computed and added in half "
        "precision (norm errors of ~0.4% exceed the clipping bound; the noise is rounded). Use "
        "`trainer.precision: bf16-mixed` (float32 parameters, norms, sums and noise) or `32-true`."
    )


__all__ = ["FULL_PRECISION", "MIXED_PRECISION", "check_precision", "widen"]
