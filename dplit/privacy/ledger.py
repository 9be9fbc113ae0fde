"""Crash-safe privacy ledger: the accountant's state written atomically after every optimizer step.

Checkpoints are written every epoch or so; a run killed in between has taken steps that no checkpoint records.
Resuming from the last checkpoint would then under-count the privacy spent. The ledger (a small JSON file,
replaced atomically with ``os.replace`` so it is never half-written) records every step, and a resume takes the
larger of the checkpoint's and the ledger's step counts (conservative: lost steps still count).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

LEDGER_PREFIX = "privacy_ledger-"
"""A ledger's file name: ``privacy_ledger-<first 12 characters of the run id>.json`` in the run's log folder."""


class PrivacyLedger:
    """Atomic per-step record of one run's accountant state.

    Args:
        path: the ledger file.
        run_id: identifies the run across resumes (kept in checkpoints), so a ledger of another run is never used.
    """

    def __init__(self, path: str | Path, run_id: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id or uuid.uuid4().hex
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def write(self, fingerprint: str, accountant_state: dict[str, Any]) -> None:
        """Replace the ledger with the current state (a crash leaves the previous or the new file, never half)."""
        payload = {"run_id": self.run_id, "fingerprint": fingerprint, "accountant": accountant_state}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._tmp, "w") as handle:
                json.dump(payload, handle)
            os.replace(self._tmp, self.path)
        except OSError as err:
            raise OSError(
                err.errno,
                f"Could not record the privacy spend in {self.path} ({err.strerror or err}; disk full?). Training "
                "stops here so that no step goes unaccounted; the checkpoints written so far stay valid. Free space "
                "and resume with `--ckpt_path` (or set `ledger: false` on DifferentialPrivacy to run without it).",
            ) from err

    def read(self, fingerprint: str) -> dict[str, Any] | None:
        """The recorded accountant state if the ledger belongs to this run and privacy configuration."""
        try:
            payload = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise ValueError(
                f"The privacy ledger {self.path} is unreadable ({err}); it should never be half-written. If you are "
                "sure no steps were taken after the checkpoint, delete it to resume."
            ) from err
        if payload.get("run_id") != self.run_id or payload.get("fingerprint") != fingerprint:
            return None
        return payload.get("accountant")


def recorded_steps(accountant_state: dict[str, Any]) -> int:
    """Logical steps in an accountant ``state_dict`` (sum of the history's step counts)."""
    return int(sum(entry[2] for entry in accountant_state.get("history", [])))


__all__ = ["LEDGER_PREFIX", "PrivacyLedger", "recorded_steps"]
