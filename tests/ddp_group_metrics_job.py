"""Run by test_ddp_group_metrics: validation under 2-process DDP (gloo); rank 0 writes the group metrics as JSON."""

import json
import sys

import lightning as L
from dp_helpers import TinyData, tiny_task

from dplit.callbacks import SubgroupMetrics

if __name__ == "__main__":
    out, n = sys.argv[1], int(sys.argv[2])
    cb = SubgroupMetrics()
    trainer = L.Trainer(
        callbacks=[cb],
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.validate(tiny_task(), datamodule=TinyData(n=n))
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump(cb.last, f)
