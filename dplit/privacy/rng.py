"""Random generators of the private pieces: Poisson sampling and noise, per rank, seeded or secure."""

from __future__ import annotations

from typing import Any

import torch

_RANK_STRIDE, _NOISE_OFFSET, _STEP_STRIDE = 1_000_003, 7_919, 7_777_777


def secure_generator() -> Any:
    """A cryptographically secure generator (Opacus' secure mode); clear error if torchcsprng is missing."""
    try:
        import torchcsprng  # type: ignore[import-not-found]
    except ImportError as err:
        from dplit.privacy.engine import PrivacyEngineError

        raise PrivacyEngineError(
            "`secure_mode: true` needs the `torchcsprng` package (cryptographically secure sampling and noise), "
            "which is not installed. Install a torchcsprng build matching your torch, or set `secure_mode: false` "
            "for experiments (the standard, non-hardened setting)."
        ) from err
    return torchcsprng.create_random_device_generator("/dev/urandom")


def make_generators(seed: int, rank: int, step: int = 0, secure: bool = False) -> tuple[Any, Any]:
    """(sampler generator, noise generator) for one rank.

    Ranks get different streams (identical streams would correlate the ranks' Poisson draws); ``step`` reseeds a
    resumed run whose saved generator state cannot be used (e.g. another number of ranks).
    """
    if secure:
        gen = secure_generator()
        return gen, gen
    base = seed + _RANK_STRIDE * rank + _STEP_STRIDE * step
    return torch.Generator().manual_seed(base), torch.Generator().manual_seed(base + _NOISE_OFFSET)


def restore_generators(
    state: dict[str, Any],
    sampler: torch.Generator,
    noise: torch.Generator,
    *,
    seed: int,
    rank: int,
    world_size: int,
    step: int,
) -> None:
    """Restore the saved single-process generator states, or reseed per rank from (seed, rank, step).

    Only rank 0's generators are in a checkpoint; giving them to every rank would correlate the ranks' draws.
    """
    if state.get("world_size") == 1 and world_size == 1 and state.get("sampler_rng") is not None:
        sampler.set_state(state["sampler_rng"])
        noise.set_state(state["noise_rng"])
        return
    fresh_sampler, fresh_noise = make_generators(seed, rank, step)
    sampler.set_state(fresh_sampler.get_state())
    noise.set_state(fresh_noise.get_state())


__all__ = ["make_generators", "restore_generators", "secure_generator"]
