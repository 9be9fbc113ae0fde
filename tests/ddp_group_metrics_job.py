"""Run by test_ddp_group_metrics: validation under 2-process DDP (gloo); rank 0 writes the group metrics as JSON."""

import json
import sys

from dp_helpers import TinyData, ddp_trainer, tiny_task

from dplit.callbacks import SubgroupMetrics

if __name__ == "__main__":
    out, n = sys.argv[1], int(sys.argv[2])
    cb = SubgroupMetrics()
    trainer = ddp_trainer([cb], enable_checkpointing=False, use_distributed_sampler=True, limit_val_batches=1.0)
    trainer.validate(tiny_task(), datamodule=TinyData(n=n))
    if trainer.is_global_zero:
        with open(out, "w") as f:
            json.dump(cb.last, f)
