"""Run by test_kill_9_between_checkpoints: DP training that SIGKILLs itself in the middle of its second epoch."""

import os
import signal
import sys

import lightning as L
from dp_helpers import TinyData, tiny_task, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from dplit.callbacks import DifferentialPrivacy


class KillMidEpoch(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup, no checkpoint


if __name__ == "__main__":
    root = sys.argv[1]
    ckpt = ModelCheckpoint(dirpath=f"{root}/ckpt", save_last=True, every_n_epochs=1)
    dp = DifferentialPrivacy(noise_multiplier=1.0, delta=1e-3)
    t = trainer(root, [dp, ckpt, KillMidEpoch()], max_epochs=3, enable_checkpointing=True)
    t.fit(tiny_task(), datamodule=TinyData())
