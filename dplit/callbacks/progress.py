"""Progress bars whose ``v_num`` is the run's ``version_N`` (the folder it writes to), not the W&B run id.

Lightning joins the versions of all loggers and keeps the last 4 characters, which with a CSV and a W&B logger is the
end of the W&B id. These bars show the version of the first logger that numbers its runs (CSV, TensorBoard).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from typing_extensions import override


def run_version(trainer: L.Trainer) -> int | str | None:
    """The ``N`` of the run's ``version_N`` folder: the first logger whose version is a number."""
    for logger in trainer.loggers:
        version = logger.version
        if isinstance(version, int) or (isinstance(version, str) and version.startswith("version_")):
            return version
    return None


def _with_version(items: dict[str, Any], trainer: L.Trainer) -> dict[str, Any]:
    version = run_version(trainer)
    if "v_num" in items and version is not None:
        items["v_num"] = str(version)  # rich shows numbers as 0.000
    return items


class VersionProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` with ``v_num`` = the run's ``version_N``."""

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _with_version(super().get_metrics(trainer, pl_module), trainer)


class VersionRichProgressBar(RichProgressBar):
    """``RichProgressBar`` with ``v_num`` = the run's ``version_N``."""

    @staticmethod
    def available() -> bool:
        """Whether ``rich`` is installed (Lightning then uses the rich bar by default, and so does dplit)."""
        return bool(_RICH_AVAILABLE)

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return _with_version(super().get_metrics(trainer, pl_module), trainer)


__all__ = ["VersionProgressBar", "VersionRichProgressBar", "run_version"]
