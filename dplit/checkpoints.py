"""Checkpoint checks before a resume: a missing or corrupted file gets a clear message, not a deep traceback."""

from __future__ import annotations

from pathlib import Path

import torch

_SPECIAL = {"last", "best", "hpc", "registry"}  # resolved by Lightning itself


class CheckpointError(ValueError):
    """The checkpoint to resume from is missing, corrupted or not a Lightning checkpoint."""


def check_checkpoint(ckpt_path: str | Path | None) -> None:
    """Raise ``CheckpointError`` unless ``ckpt_path`` is None, a Lightning alias, or a loadable checkpoint."""
    if ckpt_path is None or str(ckpt_path) in _SPECIAL or str(ckpt_path).startswith("registry:"):
        return
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"`ckpt_path` {path} does not exist. Point it at a .ckpt file of the run to resume.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:  # torch raises several types for truncated/garbled files
        raise CheckpointError(
            f"`ckpt_path` {path} is corrupted or not a checkpoint ({type(err).__name__}: {err}). Resume from an "
            "earlier checkpoint of the run (its checkpoints/ folder); the privacy ledger still counts every step "
            "taken since, so the accountant does not go backwards."
        ) from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"`ckpt_path` {path} is not a Lightning checkpoint (no `state_dict`).")


__all__ = ["CheckpointError", "check_checkpoint"]
