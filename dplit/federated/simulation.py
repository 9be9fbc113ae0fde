"""Flower simulation on this machine (Ray on loopback): one virtual SuperNode per user."""

from __future__ import annotations

import logging
import os
from typing import Any

from dplit.federated.config import FedRunConfig
from dplit.federated.data import load_data
from dplit.federated.server import RunOutcome, make_aggregator

MISSING_EXTRA = "federated training needs Flower: pip install 'dplit[federated]' (flwr[simulation], ~1 GB with Ray)"


def require_flower() -> Any:
    """The ``flwr`` module, or an ImportError saying which extra to install."""
    try:
        import flwr
        import flwr.simulation  # noqa: F401
    except ImportError as err:
        raise ImportError(MISSING_EXTRA) from err
    return flwr


def simulate(cfg: FedRunConfig, rounds: int | None = None) -> RunOutcome:
    """Runs ``cfg`` for ``rounds`` (default ``federated.rounds``) in Flower's simulation engine; raises its error."""
    require_flower()
    from flwr.simulation import run_simulation

    from dplit.federated.client import make_client_app
    from dplit.federated.server import make_server_app

    rounds = cfg.federated.rounds if rounds is None else rounds
    if rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {rounds}")
    data = load_data(cfg.data)  # bad data and unreachable privacy settings fail here, before Ray starts
    make_aggregator(cfg, data.num_users, rounds)
    outcome = RunOutcome()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend = {
        "client_resources": {"num_cpus": cfg.simulation.client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": cfg.simulation.num_cpus, "include_dashboard": False, "log_to_driver": False},
    }
    run_simulation(
        server_app=make_server_app(cfg, rounds, outcome),
        client_app=make_client_app(cfg),
        num_supernodes=data.num_users,
        backend_config=backend,  # type: ignore[arg-type]
        verbose_logging=logging.getLogger("dplit").isEnabledFor(logging.DEBUG),
    )
    if outcome.error is not None:
        raise outcome.error
    if outcome.run_dir is None:
        raise RuntimeError("the Flower simulation ended without running the ServerApp (see Flower's log above)")
    return outcome


__all__ = ["MISSING_EXTRA", "require_flower", "simulate"]
