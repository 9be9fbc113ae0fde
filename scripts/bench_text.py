"""Text-model part of ``bench_dp_overhead.py``: the tweets BiLSTM and the MiniLM transformer, DP vs non-DP.

Each configuration runs in a fresh subprocess through the real Lightning path (``ClassificationTask`` +
``Trainer.fit`` + ``dplit.callbacks.DifferentialPrivacy``), timed and memory-measured with the same ``StepTimer``
as the MNIST configurations (time per example, median over steps). Data: synthetic word hashes (the model's cost
does not depend on the words), ``--text-tokens`` tokens a row, no padding.

    bilstm_nodp        BiLSTMClassifier (2 x 200, 300-d embeddings over a 20,000-row table, trainable), no DP
    bilstm_torch_nodp  the same shapes with torch's fused nn.LSTM (the fastest non-DP LSTM on CPU), no DP
    bilstm_dp          BiLSTMClassifier + DifferentialPrivacy(grad_sample_mode="bookkeeping")
    bilstm_dp_hooks    the same with grad_sample_mode="hooks" (Opacus hooks; the LSTM's rule is one einsum)
    bilstm_opacus_dp   Opacus' own DPLSTM + nn.Embedding with hooks (the per-timestep-hook baseline); few steps
    minilm_nodp        TransformerClassifier(MiniLM-L6, finetune="all"), no DP
    minilm_dp          the same + DifferentialPrivacy(grad_sample_mode="ghost")
    minilm_dp_bk       the same + DifferentialPrivacy(grad_sample_mode="bookkeeping") (Linear, Embedding, LayerNorm)
"""

from __future__ import annotations

from functools import partial
from typing import Any

TEXT_CONFIGS = (
    "bilstm_nodp",
    "bilstm_torch_nodp",
    "bilstm_dp",
    "bilstm_dp_hooks",
    "bilstm_opacus_dp",
    "minilm_nodp",
    "minilm_dp",
    "minilm_dp_bk",
)
TEXT_MEMORY_CONFIGS = ("bilstm_nodp", "bilstm_torch_nodp", "bilstm_dp", "minilm_nodp", "minilm_dp", "minilm_dp_bk")
VOCAB, EMBED_DIM, HIDDEN = 20000, 300, 200
TEXT_SIGMA, TEXT_C, TEXT_LR = 1.0, 1.0, 1e-3


def _bilstm(kind: str) -> Any:
    import torch
    from torch import nn

    from dplit.models import BiLSTMClassifier

    if kind == "dplit":
        return BiLSTMClassifier(embedding_source=None, embedding_dim=EMBED_DIM, oov_buckets=VOCAB - 1, max_words=None)

    class TorchBiLSTM(nn.Module):
        """The same shapes; ``kind`` torch: nn.LSTM (fused), opacus: opacus.layers.DPLSTM (per-timestep cells)."""

        def __init__(self) -> None:
            super().__init__()
            self.embedding = nn.Embedding(VOCAB, EMBED_DIM, padding_idx=0)
            if kind == "torch":
                self.lstm: nn.Module = nn.LSTM(EMBED_DIM, HIDDEN, 2, bidirectional=True, batch_first=True)
            else:
                from opacus.layers import DPLSTM

                self.lstm = DPLSTM(EMBED_DIM, HIDDEN, 2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(2 * HIDDEN, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            _, (h, _) = self.lstm(self.embedding(x % VOCAB))
            return self.head(torch.cat([h[-2], h[-1]], 1))

    return TorchBiLSTM()


def _minilm() -> Any:
    from dplit.models import TransformerClassifier

    return TransformerClassifier(model_dir="minilm", finetune="all")


def token_data(n: int, tokens: int, batch_size: int, minilm: bool, seed: int) -> Any:
    """A LightningDataModule of ``n`` random token rows (word hashes for the BiLSTM, ids < 30,000 for MiniLM)."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from dplit.data import GroupedTensorDataset

    g = torch.Generator().manual_seed(seed)
    high = 30000 if minilm else 2**62
    x = torch.randint(1000 if minilm else 1, high, (n, tokens), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    dataset = GroupedTensorDataset(x, y, torch.randint(0, 2, (n,), generator=g))

    class TokenData(L.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(dataset, batch_size=batch_size, shuffle=True)

    return TokenData()


def run_text(args: Any, timer: Any) -> dict[str, Any]:
    """One text configuration through Lightning; ``timer`` is bench_dp_overhead's StepTimer."""
    import lightning as L
    import torch
    from bench_common import timed_trainer

    from dplit.tasks import ClassificationTask

    config: str = args.worker
    L.seed_everything(args.seed, verbose=False)
    minilm = config.startswith("minilm")
    if minilm:
        backbone = _minilm()
    else:
        backbone = _bilstm({"bilstm_torch_nodp": "torch", "bilstm_opacus_dp": "opacus"}.get(config, "dplit"))
    task = ClassificationTask(backbone, optimizer=partial(torch.optim.Adam, lr=TEXT_LR))
    callbacks: list[Any] = []
    if "_dp" in config:
        from dplit.callbacks import DifferentialPrivacy

        mode = {"bilstm_dp": "bookkeeping", "minilm_dp": "ghost", "minilm_dp_bk": "bookkeeping"}.get(config, "hooks")
        dp = DifferentialPrivacy(
            noise_multiplier=TEXT_SIGMA, max_grad_norm=TEXT_C, grad_sample_mode=mode, insecure_testing_seed=args.seed
        )
        callbacks.append(dp)
    trainer = timed_trainer(timer, callbacks, prefix="dplit-bench-text-")
    n = args.text_batch_size * 40
    trainer.fit(task, datamodule=token_data(n, args.text_tokens, args.text_batch_size, minilm, args.seed))
    params = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    return {"train_size": n, "trainable_params": params, "threads": torch.get_num_threads()}


def text_summary(runs: dict[str, list[dict[str, Any]]], memory: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Ratios for the final JSON line (time per example, median over repeats; peak training memory)."""
    import statistics

    us = {c: 1e6 * statistics.median(r["ex_med_s"] for r in v) for c, v in runs.items() if v}
    best = {c: 1e6 * min(r["ex_med_s"] for r in v) for c, v in runs.items() if v}  # the least disturbed run
    peak = {c: m["peak_mb"] for c, m in memory.items()}
    ratios = {  # name: (numerator, denominator, table): only those whose configurations ran
        "bilstm_dp_over_nondp_best": ("bilstm_dp", "bilstm_nodp", best),
        "bilstm_dp_over_torch_lstm_nondp_best": ("bilstm_dp", "bilstm_torch_nodp", best),
        "minilm_dp_over_nondp_best": ("minilm_dp", "minilm_nodp", best),
        "minilm_dp_bk_over_nondp_best": ("minilm_dp_bk", "minilm_nodp", best),
        "bilstm_dp_over_nondp": ("bilstm_dp", "bilstm_nodp", us),
        "bilstm_dp_over_torch_lstm_nondp": ("bilstm_dp", "bilstm_torch_nodp", us),
        "bilstm_dp_mem_over_nondp": ("bilstm_dp", "bilstm_nodp", peak),
        "bilstm_dp_mem_over_torch_lstm_nondp": ("bilstm_dp", "bilstm_torch_nodp", peak),
        "bilstm_dp_hooks_over_nondp": ("bilstm_dp_hooks", "bilstm_nodp", us),
        "minilm_dp_over_nondp": ("minilm_dp", "minilm_nodp", us),
        "minilm_dp_mem_over_nondp": ("minilm_dp", "minilm_nodp", peak),
        "minilm_dp_bk_over_nondp": ("minilm_dp_bk", "minilm_nodp", us),
        "minilm_dp_bk_mem_over_nondp": ("minilm_dp_bk", "minilm_nodp", peak),
    }
    out: dict[str, Any] = {
        name: table[a] / table[b] for name, (a, b, table) in ratios.items() if a in table and b in table
    }
    out.update(
        {
            "text_us_per_example": {c: round(v, 1) for c, v in us.items()},
            "text_ms_per_step": {
                c: round(1e3 * statistics.median(r["step_med_s"] for r in v), 1) for c, v in runs.items() if v
            },
            "text_peak_mb": {c: round(v, 1) for c, v in peak.items()},
        }
    )
    if "bilstm_opacus_dp" in us:
        out["opacus_dplstm_dp_over_bilstm_dp"] = us["bilstm_opacus_dp"] / us["bilstm_dp"]
        out["opacus_dplstm_dp_over_torch_lstm_nondp"] = us["bilstm_opacus_dp"] / us["bilstm_torch_nodp"]
    return out
