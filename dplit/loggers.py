"""W&B logging that never hangs: online when logged in and reachable, offline otherwise, off on request."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Literal

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


class AutoWandbLogger(WandbLogger):
    """``WandbLogger`` whose mode is chosen so a run without an account or network never blocks.

    Offline runs land in ``<save_dir>/wandb/offline-run-*`` and are uploaded later with ``wandb sync``.

    Args:
        project: W&B project.
        save_dir: where the ``wandb/`` run folder is written (use the run's directory).
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
        save_dir: str = "runs",
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        mode: WandbMode = "auto",
        log_model: bool = False,
        **kwargs: Any,
    ) -> None:
        resolved = resolve_wandb_mode(mode)
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
        self.resolved_mode = resolved
        log.info("W&B logging: %s", resolved)


__all__ = ["AutoWandbLogger", "resolve_wandb_mode"]
