"""Console noise a dplit user cannot act on, silenced by the CLI; dplit's own warnings and Lightning's others stay.

Each entry names the exact message and where it comes from, so that nothing else is hidden:

- Lightning's "Tip: ... install litlogger / litmodels" advertisements (``rank_zero_info`` on every run);
- torch's ``LeafSpec`` FutureWarning, raised by Lightning's own ``utilities/_pytree.py``;
- jsonargparse 4.x deprecation warnings about APIs Lightning's cli.py still uses (pinned ``jsonargparse<5``);
- LightningCLI's "args parameter" warning, which fires whenever dplit itself passes ``args`` (``dplit audit``).

W&B's "The anonymous setting has no effect" warning is avoided at its source in ``dplit.loggers.AutoWandbLogger``.
"""

from __future__ import annotations

import logging
import warnings

TIP_PREFIXES = ("💡 Tip: For seamless cloud logging", "💡 Tip: For seamless cloud uploads")


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of the given texts."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_installed = False


def quiet_console() -> None:
    """Installs the filters (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jsonargparse.*")
    warnings.filterwarnings("ignore", message=r".*LightningCLI.*jsonargparse.*")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended", category=UserWarning)
    leafspec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leafspec, category=FutureWarning)
    # rank_zero_info logs through this logger; a filter on it drops the two advertisements and nothing else
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropMessages(TIP_PREFIXES))


__all__ = ["quiet_console"]
