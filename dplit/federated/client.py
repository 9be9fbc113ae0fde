"""The client side: local training of a dplit LightningModule on one user's data, and the Flower ``ClientApp``.

A client receives the global trainable parameters (one float32 vector [P]), trains the dataset's task
(:func:`dplit.federated.models.build_task`) for ``local_epochs`` with SGD at ``local_lr`` through a Lightning
``Trainer``, and replies with its update (new minus global parameters, [P]). Clipping and noise happen on the server
(:mod:`dplit.federated.dp`). Which user a node holds comes from its node config ``partition-id`` (set by the
simulation, or ``flower-supernode --node-config "partition-id=3"`` in a deployment).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from dplit.federated.config import FedRunConfig
from dplit.federated.data import FederatedData, load_data
from dplit.federated.models import build_task, get_flat, set_flat
from dplit.tasks.base import GroupedTask

_TASKS: dict[int, GroupedTask] = {}  # one task per config per worker process, reused across clients and rounds


def _task(cfg: FedRunConfig, num_classes: int) -> GroupedTask:
    key = hash(repr(cfg.to_dict()))
    if key not in _TASKS:
        _TASKS[key] = build_task(cfg, num_classes)
    return _TASKS[key]


def local_train(cfg: FedRunConfig, data: FederatedData, user: int, global_params: Tensor, round_: int) -> Tensor:
    """User ``user``'s update [P] after ``local_epochs`` of SGD from ``global_params`` [P]."""
    import lightning as L

    if not 0 <= user < data.num_users:
        raise ValueError(f"client partition-id {user} is outside the {data.num_users} users of {cfg.data.root}")
    u = data.users[user]
    if len(u.y_train) == 0:
        raise ValueError(f"client for user {u.name!r} has no training data ({cfg.data.root}); drop the user")
    torch.set_num_threads(1)
    task = _task(cfg, data.num_classes)
    set_flat(task, global_params)
    dataset = TensorDataset(u.x_train, u.y_train, torch.zeros(len(u.y_train), dtype=torch.long))
    shuffle = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_ * 7919 + user)  # batch order: public
    loader = DataLoader(dataset, batch_size=cfg.federated.local_batch_size, shuffle=True, generator=shuffle)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    trainer = L.Trainer(
        max_epochs=cfg.federated.local_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    with warnings.catch_warnings():
        for noise in ("num_workers", "does not have many workers", "log_every_n_steps", "val_dataloader", "LeafSpec"):
            warnings.filterwarnings("ignore", message=f".*{noise}")
        trainer.fit(task, train_dataloaders=loader)
    return get_flat(task) - global_params


def make_client_app(cfg: FedRunConfig) -> Any:
    """A Flower ``ClientApp`` whose ``train`` handler runs :func:`local_train` for its node's user."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if "partition-id" not in context.node_config:
            raise ValueError("this SuperNode has no `partition-id` in its node config: start it with "
                             "--node-config 'partition-id=<user index>'")  # fmt: skip
        user = int(context.node_config["partition-id"])  # type: ignore[arg-type]
        data = load_data(cfg.data)
        global_params = torch.from_numpy(msg.content.array_records["arrays"].to_numpy_ndarrays()[0].copy())
        round_ = int(msg.content.config_records["config"]["round"])  # type: ignore[arg-type]
        update = local_train(cfg, data, user, global_params, round_)
        content = RecordDict(
            {
                "arrays": ArrayRecord(numpy_ndarrays=[update.numpy()]),
                "metrics": MetricRecord({"num_examples": len(data.users[user].y_train)}),
            }
        )
        return Message(content=content, reply_to=msg)

    return app


__all__ = ["local_train", "make_client_app"]
