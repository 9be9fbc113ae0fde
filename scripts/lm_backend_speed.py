"""Time one DP training step of a causal LM under each per-sample clipping backend (issue 15: which
``grad_sample_mode`` the ``lm_bias_*_dp`` configs use).

A randomly initialised Llama of SmolLM2's shape family (tied embeddings, RMSNorm; the size is a flag), CDA units of
K rows, the full Lightning path (``DifferentialPrivacy`` callback, Poisson sampling with q = 1 so that every step
holds all units). Reports the median wall time of the steps after the first, per backend; a backend that refuses the
setup is reported with its refusal. Nothing is downloaded.

    nice -n 10 python scripts/lm_backend_speed.py --hidden 128 --layers 4 --vocab 8192 --block 64 --units 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from dplit.callbacks import DifferentialPrivacy
from dplit.models.causal_lm import CausalLM
from dplit.tasks.causal_lm import CausalLMTask


class Units(L.LightningDataModule):
    def __init__(self, units: int, k: int, block: int, vocab: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (units, k, block), generator=g)
        self.dataset = TensorDataset(ids, ids.clone(), torch.zeros(units, dtype=torch.int64))
        self.units = units

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.units)


class Timer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--units", type=int, default=8)
    parser.add_argument("--k", type=int, default=2, help="rows per unit (2: CDA)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--modes", default="hooks,functorch,ghost,bookkeeping")
    args = parser.parse_args()
    config = {"model_type": "llama", "num_hidden_layers": args.layers, "hidden_size": args.hidden,
              "intermediate_size": 4 * args.hidden, "num_attention_heads": 4, "num_key_value_heads": 2,
              "vocab_size": args.vocab, "max_position_embeddings": args.block, "tie_word_embeddings": True}  # fmt: skip
    print(f"device: cpu, torch threads {torch.get_num_threads()}; model {config}; {args.units} units x K={args.k} "
          f"rows x {args.block} tokens; {args.steps} steps")  # fmt: skip
    for mode in args.modes.split(","):
        task = CausalLMTask(CausalLM(config=config), optimizer=lambda p: torch.optim.Adam(p, lr=1e-4))
        timer = Timer()
        dp = DifferentialPrivacy(noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode, ledger=False)
        trainer = L.Trainer(max_steps=args.steps, max_epochs=args.steps, callbacks=[dp, timer], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            accelerator="cpu", limit_val_batches=0)  # fmt: skip
        try:
            trainer.fit(task, datamodule=Units(args.units, args.k, args.block, args.vocab))
        except Exception as err:  # noqa: BLE001  (a refusal is a result here)
            print(f"{mode:12s} refused: {type(err).__name__}: {str(err)[:160]}")
            continue
        steady = timer.times[1:] or timer.times
        print(f"{mode:12s} median step {statistics.median(steady):.3f} s (first {timer.times[0]:.3f} s, "
              f"{len(timer.times)} steps)")  # fmt: skip


if __name__ == "__main__":
    main()
