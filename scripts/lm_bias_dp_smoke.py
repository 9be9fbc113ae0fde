"""A few DP steps of SmolLM2-135M on BOLD's Wikipedia sentences with CDA units, to check that a backend runs on the
real model (tied embeddings, LlamaRMSNorm, 49,152-token vocabulary) and to time it. Not a result: no bias metric is
computed (that is ``dplit fit --config configs/lm_bias_cda_dp.yaml``).

    nice -n 10 python scripts/lm_bias_dp_smoke.py --root ../shared/data/lm_bias --mode bookkeeping --steps 2
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

import lightning as L
import torch

from dplit.callbacks import DifferentialPrivacy
from dplit.data.lm_bias import LMCorpusDataModule
from dplit.models.causal_lm import CausalLM
from dplit.tasks.causal_lm import CausalLMTask


class Timer(L.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, idx: int) -> None:
        self.rows.append((len(batch[2]), time.perf_counter() - self.start, float(outputs["loss"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="../shared/data/lm_bias")
    parser.add_argument("--mode", default="bookkeeping")
    parser.add_argument("--finetune", default="all", choices=["all", "last_k", "lora"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="expected units a logical batch")
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--limit-train", type=int, default=200, help="training units kept (q = batch / this)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = LMCorpusDataModule(root=args.root, tokenizer="smollm2", block_size=args.block, cda=True,
                              batch_size=args.batch_size, limit_train=args.limit_train)  # fmt: skip
    task = CausalLMTask(CausalLM("smollm2", finetune=args.finetune),
                        optimizer=lambda p: torch.optim.Adam(p, lr=1e-4))  # fmt: skip
    print(f"loaded in {time.perf_counter() - t0:.0f} s; trainable {task.backbone.num_trainable:,}")
    timer = Timer()
    dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=args.mode, ledger=False)
    trainer = L.Trainer(max_steps=args.steps, callbacks=[dp, timer], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(task, datamodule=data)
    for i, (units, seconds, loss) in enumerate(timer.rows):
        print(f"step {i}: {units} units (x2 rows, {args.block} tokens), {seconds:.1f} s, loss {loss:.3f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"mode {args.mode}, finetune {args.finetune}: accounted steps {dp.accountant.steps}, "
        f"epsilon {dp.epsilon:.3f}, peak RSS {peak:.1f} GiB, torch threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
