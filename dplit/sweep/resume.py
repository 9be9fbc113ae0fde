"""Resuming a sweep cell that was stopped part-way (a killed job, a preempted node, a machine that went away).

A cell's ``dplit fit`` saves a checkpoint every epoch (Lightning's ``ModelCheckpoint``). When the sweep trains a cell
again, and the cell's last attempt ran the same cell config with the same ``fit_args``, the new attempt continues
from that attempt's newest complete checkpoint (``--ckpt_path``) in a new ``version_N``, instead of starting over.
The DP callback restores its accountant and ledger from the checkpoint (``dplit.privacy.resume``: it refuses a
changed privacy configuration, and counts the steps the stopped attempt took after its checkpoint), so the cell's
epsilon is the whole training's. The resumed version's ``metrics.csv`` holds the epochs after the checkpoint.

``OUT/<cell>/attempt.json`` records the attempt: a key (SHA-256 of the cell's config values and ``fit_args``) and
when the first attempt with that key started. Only checkpoints written since then count: a changed cell or
``fit_args`` starts over. A checkpoint cut short by a kill fails its zip check (CRC of every member, no unpickling)
and the next older one is used.
"""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import yaml

from dplit.sweep.cells import CONFIG_NAME, Cell
from dplit.sweep.spec import SweepSpec

ATTEMPT = "attempt.json"


def attempt_key(spec: SweepSpec, cell: Cell) -> str:
    """SHA-256 of the cell's written ``config.yaml`` (its values, not its comments) and the spec's ``fit_args``:
    what a resumed run must share."""
    config = yaml.safe_load((spec.out / cell.name / CONFIG_NAME).read_text())
    text = json.dumps([config, list(spec.fit_args)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def complete(path: Path) -> bool:
    """Whether ``path`` is a whole checkpoint archive (every member's CRC checks; nothing is unpickled)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile, EOFError, ValueError):
        return False


def resume_checkpoint(folder: Path, key: str) -> Path | None:
    """The newest complete checkpoint of the cell's attempts with ``key`` (written since the first of them started),
    or None: no such attempt, or no complete checkpoint."""
    try:
        record = json.loads((folder / ATTEMPT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    since = float(record.get("since", float("inf")))
    found = [(p.stat().st_mtime, p) for p in folder.glob("version_*/checkpoints/*.ckpt") if p.is_file()]
    for mtime, path in sorted(found, reverse=True):
        if mtime >= since and complete(path):
            return path
    return None


def record_attempt(folder: Path, key: str) -> None:
    """Notes that an attempt with ``key`` starts now (keeping the first start time of an unchanged key)."""
    from dplit.sweep.run import write_atomic  # run imports this module

    since = time.time()
    try:
        record = json.loads((folder / ATTEMPT).read_text())
        if isinstance(record, dict) and record.get("key") == key:
            since = float(record["since"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    write_atomic(folder / ATTEMPT, json.dumps({"key": key, "since": since}) + "\n")


def resume_args(spec: SweepSpec, cell: Cell) -> list[str]:
    """``["--ckpt_path", <checkpoint>]`` when the cell's last attempt can be continued, else ``[]``; records this
    attempt. Call after the cell's config is written, right before training it."""
    folder = spec.out / cell.name
    key = attempt_key(spec, cell)
    checkpoint = resume_checkpoint(folder, key)
    record_attempt(folder, key)
    return [] if checkpoint is None else ["--ckpt_path", str(checkpoint)]


__all__ = ["ATTEMPT", "attempt_key", "complete", "record_attempt", "resume_args", "resume_checkpoint"]
