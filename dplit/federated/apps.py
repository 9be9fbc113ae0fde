"""Module-level Flower apps for a multi-machine deployment (``flwr run`` against a SuperLink; docs/federated/).

Flower loads ``serverapp = "dplit.federated.apps:server_app"`` and ``clientapp = "dplit.federated.apps:client_app"``
from the Flower App's ``pyproject.toml``; both read the dplit YAML config named by the run config key
``dplit-config`` (and ``rounds``, 0 for the config's own). On a SuperNode, ``data.root`` may be overridden by the node
config key ``data-root`` (each machine holds its own users' data), and ``partition-id`` says which user it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from dplit.federated.client import make_client_app
from dplit.federated.config import FedRunConfig, load_config
from dplit.federated.server import RunOutcome, run_rounds

server_app = ServerApp()
client_app = ClientApp()
_CLIENT_APPS: dict[tuple[str, str], Any] = {}


def _config(context: Context) -> FedRunConfig:
    path = context.run_config.get("dplit-config")
    if not isinstance(path, str):
        raise ValueError('the Flower App\'s [tool.flwr.app.config] needs `dplit-config = "<federated YAML>"`')
    return load_config(path)


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    cfg = _config(context)
    rounds = int(context.run_config.get("rounds", 0)) or cfg.federated.rounds  # type: ignore[arg-type]
    outcome = RunOutcome()
    run_rounds(grid, cfg, rounds, outcome, node_timeout_s=float(context.run_config.get("node-timeout-s", 300)))  # type: ignore[arg-type]
    if outcome.error is not None:
        raise outcome.error


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    cfg = _config(context)
    root = context.node_config.get("data-root")
    if isinstance(root, str):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root))
    key = (str(context.run_config.get("dplit-config")), str(root))
    if key not in _CLIENT_APPS:
        _CLIENT_APPS[key] = make_client_app(cfg)
    return _CLIENT_APPS[key](msg, context)  # type: ignore[no-any-return]


__all__ = ["client_app", "server_app"]
