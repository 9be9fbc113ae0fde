"""Resuming a private run: refuse a changed privacy configuration, continue the accountant, never go backwards."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import Any

from dplit.privacy.accounting import PrivacyAccountant
from dplit.privacy.config import PrivacyConfigError
from dplit.privacy.ledger import LEDGER_PREFIX, PrivacyLedger, recorded_steps

log = logging.getLogger(__name__)


def check_same_privacy(state: dict[str, Any], fingerprint: str, noise_multiplier: float, sample_rate: float) -> None:
    """Refuse a checkpoint trained under another privacy configuration (its accountant would be wrong here)."""
    if state["fingerprint"] != fingerprint:
        raise PrivacyConfigError(
            "The checkpoint was trained with a different privacy configuration (noise_multiplier "
            f"{state['noise_multiplier']:.4g} vs {noise_multiplier:.4g}, sample rate {state['sample_rate']:.4g} vs "
            f"{sample_rate:.4g}, or clip/delta/accountant/sampling/dataset size changed). Resuming would make the "
            "accountant wrong: resume with the original settings, or start a new run without `ckpt_path`."
        )


def open_ledger(
    state: dict[str, Any] | None, accountant: PrivacyAccountant, fingerprint: str, log_dir: str | Path
) -> PrivacyLedger:
    """The run's ledger: the checkpoint's (whose extra steps, taken after the checkpoint, are added to
    ``accountant``) or a new one in ``log_dir``."""
    if not state or not state.get("ledger_path"):
        run_id = uuid.uuid4().hex
        # one file per run: a second run in the same log dir never overwrites the first run's record
        return PrivacyLedger(Path(log_dir) / f"{LEDGER_PREFIX}{run_id[:12]}.json", run_id=run_id)
    ledger = PrivacyLedger(state["ledger_path"], run_id=state.get("run_id"))
    recorded = ledger.read(fingerprint)
    if recorded is not None and recorded_steps(recorded) > accountant.steps:
        log.warning(
            "The privacy ledger %s records %d step(s) taken after the checkpoint (the run stopped between "
            "checkpoints); they are counted: the accountant never goes backwards.",
            ledger.path,
            recorded_steps(recorded) - accountant.steps,
        )
        accountant.load_state_dict(recorded)
    return ledger


__all__ = ["check_same_privacy", "open_ledger"]
