"""Run by test_ddp_privacy: DP training under 2-process DDP (gloo). Each rank saves its batches and parameters.

Arguments: OUT SIGMA STEPS [MODE [ALGORITHM [NODES]]]. NODES=1 (default): Lightning starts the 2 processes on one
node. NODES=2: one process per "node", started by ``torchrun --nnodes 2`` (tests/test_multinode.py), which Lightning
detects from the environment torchrun sets.
"""

import sys

import torch
from dp_helpers import TinyData, ddp_trainer, tiny_task
from lightning.pytorch.callbacks import ModelCheckpoint
from test_privacy_callback import Probe

from dplit.callbacks import DifferentialPrivacy

if __name__ == "__main__":
    out, sigma, steps = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "hooks"
    algorithm = sys.argv[5] if len(sys.argv) > 5 else "dpsgd"
    nodes = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    extra = {"count_noise": 1e-6} if algorithm == "dpsgd_f" else {}
    probe = Probe()
    dp = DifferentialPrivacy(
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        delta=1e-3,
        insecure_testing_seed=11,
        grad_sample_mode=mode,
        algorithm=algorithm,
        **extra,
    )
    ckpt = ModelCheckpoint(dirpath=f"{out}.ckpt", save_last=True)
    layout = {"devices": 1, "num_nodes": 2} if nodes == 2 else {}
    trainer = ddp_trainer([dp, probe, ckpt], max_steps=steps, **layout)
    task = tiny_task(lr=1.0, hidden=256)
    trainer.fit(task, datamodule=TinyData(n=400, batch_size=40))
    torch.save(
        {
            "steps": [{k: s[k] for k in ("batch", "before", "after")} for s in probe.steps],
            "epsilon": dp.epsilon,
            "accountant_steps": dp.accountant.steps,
            "sample_rate": dp.plan.sample_rate,
            "batch_size": dp.plan.batch_size,
            "algorithm_state": dp.algorithm.state_dict(),
            "world_size": trainer.world_size,
            "node_rank": trainer.node_rank,
            "cluster": type(trainer.strategy.cluster_environment).__name__,
        },
        f"{out}.rank{trainer.global_rank}.pt",
    )
