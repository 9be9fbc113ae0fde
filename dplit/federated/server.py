"""The server side: the round loop of DP-FedAvg on a Flower ``Grid``, and the Flower ``ServerApp``.

Each round: sample and account (:meth:`DPFedAvg.sample_round`), send the global parameters to the sampled nodes,
collect their updates (a failed or missing reply is a zero update), aggregate (clip, noise once, fixed denominator),
step the global model, evaluate per user group, and log one row (``privacy/epsilon`` included) to the run folder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dplit.federated.config import FederatedConfigError, FedRunConfig
from dplit.federated.data import FederatedData, load_data
from dplit.federated.dp import DPFedAvg, calibrate_rounds, default_delta
from dplit.federated.evaluation import RunWriter, evaluate
from dplit.federated.models import build_task, get_flat, set_flat

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What the server loop reports back to the caller (the simulation runs it in a thread)."""

    run_dir: str | None = None
    error: BaseException | None = None
    last: dict[str, float] = field(default_factory=dict)


def make_aggregator(cfg: FedRunConfig, num_users: int, rounds: int) -> DPFedAvg:
    """The DP-FedAvg (or FedAvg) aggregator of ``cfg`` for ``num_users`` users; with ``target_epsilon``, z is
    calibrated over the ``rounds`` this run plans (``--rounds`` overrides ``federated.rounds``)."""
    p, f = cfg.privacy, cfg.federated
    if p is None:
        return DPFedAvg(num_users=num_users, sample_rate=f.sample_rate)
    delta = p.delta if p.delta is not None else default_delta(num_users)
    z = p.noise_multiplier
    if z is None:
        assert p.target_epsilon is not None
        z = calibrate_rounds(target_epsilon=p.target_epsilon, sample_rate=f.sample_rate, rounds=rounds,
                             delta=delta, accountant=p.accountant)  # fmt: skip
        log.info(
            "Calibrated noise_multiplier z=%.4f for user-level epsilon=%g over %d rounds", z, p.target_epsilon, rounds
        )  # noqa: E501
    return DPFedAvg(num_users=num_users, sample_rate=f.sample_rate, clip=p.clip, noise_multiplier=z, delta=delta,
                    accountant=p.accountant, testing_seed=p.insecure_testing_seed)  # fmt: skip


def wait_for_nodes(grid: Any, num_users: int, timeout_s: float) -> list[int]:
    """The node ids, one per user, sorted; refuses fewer (or more) nodes than users once ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = sorted(int(n) for n in grid.get_node_ids())
        if len(nodes) >= num_users or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(nodes) != num_users:
        raise FederatedConfigError(
            f"{len(nodes)} client node(s) are connected but the data has {num_users} users: Poisson sampling at "
            f"rate q is accounted over exactly N={num_users} users, one node each. Start one SuperNode per user "
            "(or set data.max_users to the number of nodes)"
        )
    return nodes


def run_rounds(grid: Any, cfg: FedRunConfig, rounds: int, outcome: RunOutcome, node_timeout_s: float = 60.0) -> None:
    """The whole federated run on ``grid``; fills ``outcome`` (errors included: Flower's simulation runs the
    ServerApp in a thread, whose exceptions the caller would not see) and writes the run folder."""
    try:
        _run_rounds(grid, cfg, rounds, outcome, node_timeout_s)
    except BaseException as err:
        outcome.error = outcome.error or err


def _run_rounds(grid: Any, cfg: FedRunConfig, rounds: int, outcome: RunOutcome, node_timeout_s: float) -> None:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

    data: FederatedData = load_data(cfg.data)
    agg = make_aggregator(cfg, data.num_users, rounds)
    config = cfg.to_dict()
    config["federated"]["rounds"] = rounds
    writer = RunWriter(cfg.output_dir, config)
    outcome.run_dir = str(writer.dir)
    summary: dict[str, Any] = {"kind": "fit", "status": "running", "run_dir": str(writer.dir), "federated": True}
    writer.summary(summary)
    try:
        nodes = wait_for_nodes(grid, data.num_users, node_timeout_s)
        task = build_task(cfg, data.num_classes)
        params = get_flat(task)  # [P]
        for r in range(1, rounds + 1):
            plan = agg.sample_round()  # accounted here, before the model reaches any client
            row: dict[str, float] = {"round": r, "step": r, "epoch": r - 1}
            if agg.private:
                row.update({"privacy/epsilon": agg.epsilon(), "privacy/delta": agg.delta,
                            "privacy/noise_multiplier": float(agg.noise_multiplier or 0), "privacy/sample_rate": agg.sample_rate})  # fmt: skip  # noqa: E501
            arrays = ArrayRecord(numpy_ndarrays=[params.numpy()])
            messages = [
                Message(
                    content=RecordDict({"arrays": arrays, "config": ConfigRecord({"round": r})}),
                    message_type=MessageType.TRAIN,
                    dst_node_id=nodes[i],
                )  # fmt: skip
                for i in plan.participants
            ]
            replies = list(grid.send_and_receive(messages, timeout=cfg.federated.round_timeout_s)) if messages else []
            updates = []
            for reply in replies:
                if reply.has_error():
                    log.warning("round %d: a client failed (%s); it counts as a zero update", r, reply.error.reason)
                    continue
                updates.append(torch.from_numpy(reply.content["arrays"].to_numpy_ndarrays()[0].copy()))
            update = agg.aggregate(updates, params.numel())
            params = params + cfg.federated.server_lr * update
            row.update({"fed/participants": len(plan.participants), "fed/updates": len(updates),
                        "fed/failed": len(plan.participants) - len(updates)})  # fmt: skip
            if r % cfg.federated.eval_every == 0 or r == rounds:
                set_flat(task, params)
                row.update(evaluate(task, data, cfg.data.primary))
            writer.log(row)
            outcome.last.update(row)
            log.info("round %d/%d: %d sampled, %d updates, val/acc=%s, epsilon=%s", r, rounds,
                     len(plan.participants), len(updates), row.get("val/acc"), row.get("privacy/epsilon"))  # fmt: skip
        summary["status"] = "completed"
    except BaseException as err:  # recorded in summary.json, then re-raised by the caller
        outcome.error = err
        summary.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
    finally:
        eps = agg.epsilon() if agg.private else None
        summary.update({
            "rounds": agg.rounds,
            "privacy": None if not agg.private else {
                "epsilon": None if eps is None or math.isinf(eps) else eps, "delta": agg.delta,
                "noise_multiplier": agg.noise_multiplier, "sample_rate": agg.sample_rate, "clip": agg.clip,
                "steps": agg.rounds, "unit": "user"},
            "acc": outcome.last.get("val/acc"), "split": "val",
            "train_counts": _bucket_counts(data, cfg.data.primary),
        })  # fmt: skip
        writer.summary(summary)


def _bucket_counts(data: FederatedData, attr: str) -> dict[str, int]:
    counts = dict.fromkeys(data.buckets[attr], 0)
    for user, bucket in zip(data.users, data.user_bucket[attr], strict=True):
        counts[data.buckets[attr][bucket]] += len(user.y_train)
    return counts


def make_server_app(cfg: FedRunConfig, rounds: int, outcome: RunOutcome) -> Any:
    """A Flower ``ServerApp`` running :func:`run_rounds`."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, cfg, rounds, outcome)

    return app


__all__ = ["RunOutcome", "make_aggregator", "make_server_app", "run_rounds", "wait_for_nodes"]
