"""Secret randomness for the private pieces: Poisson sampling and noise (invariant 5).

Amplification by subsampling assumes the sample is secret, and the Gaussian mechanism assumes the noise is. Both
generators are therefore seeded from OS entropy (``os.urandom``), never from the experiment seed that every run
publishes in its ``config.yaml``; their states are never written to a checkpoint, ledger or log, and a resumed run
draws fresh ones. Reproducible noise exists only behind ``insecure_testing_seed``, a loudly named switch for tests,
which is recorded in the run's privacy state and warned about on every fit.

``secure_mode`` goes further (Opacus' hardened setting): a cryptographically secure generator (torchcsprng) and
noise robust to floating-point attacks.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

_RANK_STRIDE, _NOISE_OFFSET, _STEP_STRIDE = 1_000_003, 7_919, 7_777_777

INSECURE_SEED_WARNING = (
    "DifferentialPrivacy: `insecure_testing_seed` is set, so the Poisson sampling and the noise are derived from a "
    "number written in the run's config: anyone holding it can regenerate the noise and recover the clipped "
    "gradients. The reported epsilon does NOT hold. Use it only in tests; remove it for any real run."
)


def secure_generator() -> Any:
    """A cryptographically secure generator (Opacus' secure mode); clear error if torchcsprng is missing."""
    try:
        import torchcsprng  # type: ignore[import-not-found]
    except ImportError as err:
        from dplit.privacy.engine import PrivacyEngineError

        raise PrivacyEngineError(
            "`secure_mode: true` needs the `torchcsprng` package (cryptographically secure sampling and noise), "
            "which is not installed. Install a torchcsprng build matching your torch, or set `secure_mode: false` "
            "(the default: generators seeded from OS entropy, never from the run's seed)."
        ) from err
    return torchcsprng.create_random_device_generator("/dev/urandom")


def entropy_seed() -> int:
    """63 bits from the operating system's entropy pool (not derivable from anything a run writes)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def make_generators(
    *, rank: int, step: int = 0, secure: bool = False, testing_seed: int | None = None
) -> tuple[Any, Any]:
    """(sampler generator, noise generator) for one rank.

    Args:
        rank: the process's global rank (ranks get independent streams).
        step: logical steps already taken; only used with ``testing_seed``, so a resumed test run is reproducible
            without any generator state being saved.
        secure: torchcsprng generators (``secure_mode``).
        testing_seed: TESTS ONLY: derive both streams from this public number (see ``INSECURE_SEED_WARNING``).
    """
    if secure:
        gen = secure_generator()
        return gen, gen
    if testing_seed is not None:
        warnings.warn(INSECURE_SEED_WARNING, stacklevel=2)
        base = testing_seed + _RANK_STRIDE * rank + _STEP_STRIDE * step
        return torch.Generator().manual_seed(base), torch.Generator().manual_seed(base + _NOISE_OFFSET)
    return torch.Generator().manual_seed(entropy_seed()), torch.Generator().manual_seed(entropy_seed())


__all__ = ["INSECURE_SEED_WARNING", "entropy_seed", "make_generators", "secure_generator"]
