"""Loggers whose folder follows ``trainer.default_root_dir``, and W&B logging that never hangs.

``save_dir`` left out (None) means "the run's ``trainer.default_root_dir``": the dplit CLI fills it in before the
loggers are built, so ``--trainer.default_root_dir DIR`` moves the CSV metrics, the checkpoints, the privacy ledger
and the W&B run together, as Lightning's default logger does. A ``save_dir`` that is given is used as is.
W&B runs online when logged in and reachable, offline otherwise, off on request.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

WandbMode = Literal["auto", "online", "offline", "disabled"]


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return auth.authenticators(base.split(":")[0]) is not None


def _reachable(host: str = "api.wandb.ai", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_wandb_mode(mode: WandbMode = "auto") -> str:
    """``WANDB_MODE`` wins; ``auto`` is online only with credentials and a reachable server, else offline."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return (
            "disabled"
            if env in ("disabled", "dryrun_disabled")
            else ("offline" if env in ("offline", "dryrun") else env)
        )
    if mode != "auto":
        return mode
    if _has_credentials() and _reachable():
        return "online"
    return "offline"


DEFAULT_SAVE_DIR = "runs"
"""Where a logger built outside the dplit CLI without a ``save_dir`` writes."""


class CSVLogger(_LightningCSVLogger):
    """Lightning's ``CSVLogger`` (``<save_dir>/<name>/version_N/metrics.csv``) with ``save_dir`` optional.

    Args:
        save_dir: the run's folder; None: ``trainer.default_root_dir`` (filled in by the dplit CLI).
        name: sub-folder between ``save_dir`` and ``version_N`` ("" for none).
        version: version number or folder name (default: the next free ``version_N``).
        prefix: prefix of every metric name.
        flush_logs_every_n_steps: how often the CSV file is written.
    """

    def __init__(
        self,
        save_dir: str | None = None,
        name: str | None = "",
        version: int | str | None = None,
        prefix: str = "",
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__(
            save_dir=DEFAULT_SAVE_DIR if save_dir is None else save_dir,
            name=name,
            version=version,
            prefix=prefix,
            flush_logs_every_n_steps=flush_logs_every_n_steps,
        )


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` whose mode is chosen so a run without an account or network never blocks.

    Offline runs land in ``<save_dir>/wandb/offline-run-*`` and are uploaded later with ``wandb sync``.

    Args:
        project: W&B project.
        save_dir: where the ``wandb/`` run folder is written; None: ``trainer.default_root_dir`` (dplit CLI).
        name: run name (default: W&B's).
        group: W&B group, e.g. a sweep name.
        tags: W&B tags.
        mode: ``auto`` (online if logged in and reachable, else offline), ``online``, ``offline``, ``disabled``.
            The ``WANDB_MODE`` environment variable overrides it.
        log_model: upload checkpoints as W&B artifacts (online only).
    """

    def __init__(
        self,
        project: str = "dplit",
        save_dir: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: WandbMode = "auto",
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        resolved = resolve_wandb_mode(mode)
        save_dir = DEFAULT_SAVE_DIR if save_dir is None else save_dir
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        import wandb

        settings = wandb.Settings(init_timeout=30, silent=True, x_disable_stats=True)
        super().__init__(
            project=project,
            save_dir=save_dir,
            name=name,
            group=group,
            tags=tags,
            mode=resolved,
            offline=resolved == "offline",
            log_model=log_model and resolved == "online",
            settings=settings,
            **kwargs,
        )
        # Lightning passes `anonymous=None` to wandb.init, and wandb warns about any value of it ("The anonymous
        # setting has no effect ..."): leave the key out so that warning, which no user can act on, is not printed.
        init_args = getattr(self, "_wandb_init", None)
        if isinstance(init_args, dict) and init_args.get("anonymous") is None:
            init_args.pop("anonymous", None)
        self.resolved_mode = resolved
        log.info("W&B logging: %s", resolved)


def wandb_location(logger: WandbLogger) -> dict[str, str]:
    """Where a W&B logger's run goes: ``{"mode", "url"}`` online, ``{"mode", "dir", "sync"}`` offline, ``{"mode"}``
    when disabled. Starts the run if it has not started yet (Lightning does so at the start of every stage)."""
    mode = getattr(logger, "resolved_mode", None) or resolve_wandb_mode("auto")
    if mode == "disabled":
        return {"mode": "disabled"}
    run = logger.experiment
    if mode == "online" and getattr(run, "url", None):
        return {"mode": "online", "url": str(run.url)}
    run_dir = Path(run.dir).parent if getattr(run, "dir", None) else Path(logger.save_dir or ".") / "wandb"
    return {"mode": "offline", "dir": str(run_dir), "sync": f"wandb sync {run_dir}"}


__all__ = ["AutoWandbLogger", "CSVLogger", "resolve_wandb_mode", "wandb_location"]
