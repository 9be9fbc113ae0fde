"""Small federated models and the task each dataset trains (a dplit LightningModule, DP-free as every task)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from dplit.federated.config import FedRunConfig
from dplit.models.lstm import LSTM
from dplit.tasks.classification import ClassificationTask


class CharLSTM(nn.Module):
    """LEAF's Shakespeare model, small: character embedding -> LSTM -> next-character logits.

    Input: character ids ``[B, T]`` (0 = outside the alphabet, also fed as a character); output ``[B, num_chars]``.
    The LSTM is :class:`dplit.models.lstm.LSTM` (per-example gradients by einsum, for local DP if wanted).
    """

    def __init__(self, num_chars: int, embedding_dim: int = 8, hidden_size: int = 64, num_layers: int = 1) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_chars, embedding_dim)
        self.lstm = LSTM(embedding_dim, hidden_size, num_layers)
        self.head = nn.Linear(hidden_size, num_chars)

    def forward(self, x: Tensor) -> Tensor:
        _, final = self.lstm(self.embedding(x))  # final [B, H]
        return self.head(final)


class WordLSTM(nn.Module):
    """The seed paper's Reddit model, sized by the config: word embedding -> stacked LSTM -> tied decoder.

    Input: word ids ``[B, T]`` (0 = padding, 1 = out of vocabulary); output next-word logits ``[B, V]``, computed as
    ``proj(h) @ embedding.weight.T + bias`` (tied embeddings; ``proj`` maps hidden_size to embedding_dim, identity
    when they are equal).
    """

    def __init__(self, vocab: int, embedding_dim: int = 32, hidden_size: int = 64, num_layers: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, embedding_dim)
        self.lstm = LSTM(embedding_dim, hidden_size, num_layers)
        self.proj: nn.Module = nn.Identity() if hidden_size == embedding_dim else nn.Linear(hidden_size, embedding_dim)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x: Tensor) -> Tensor:
        _, final = self.lstm(self.embedding(x))  # final [B, H]
        return self.proj(final) @ self.embedding.weight.T + self.bias  # [B, V]


def build_task(cfg: FedRunConfig, num_classes: int) -> ClassificationTask:
    """The dataset's task with its backbone, initialised from the public ``seed`` (identical on every node)."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    backbone: nn.Module
    if cfg.data.dataset == "shakespeare":
        backbone = CharLSTM(num_classes, m.embedding_dim, m.hidden_size, m.num_layers)
    elif cfg.data.dataset == "reddit":
        backbone = WordLSTM(num_classes, m.embedding_dim, m.hidden_size, m.num_layers)
    else:
        from dplit.models.bilstm import BiLSTMClassifier

        backbone = BiLSTMClassifier(
            num_classes=num_classes,
            hidden_size=m.hidden_size,
            num_layers=m.num_layers,
            embedding_source=m.embedding_source,
            oov_buckets=m.oov_buckets,
            embedding_dim=m.embedding_dim if m.embedding_source is None else None,
            seed=cfg.seed,
        )
    refuse_batchnorm(backbone)
    optimizer = functools.partial(torch.optim.SGD, lr=cfg.federated.local_lr)
    return ClassificationTask(backbone=backbone, optimizer=optimizer)


def refuse_batchnorm(module: nn.Module) -> None:
    """Running statistics are not model updates the server clips: refuse layers that keep them."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.modules.batchnorm._NormBase):
            raise ValueError(f"federated model layer {name!r} ({type(sub).__name__}) keeps running statistics, which "
                             "DP-FedAvg does not clip or noise; use GroupNorm/LayerNorm")  # fmt: skip


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters in a fixed order: what clients send and the server clips."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def get_flat(module: nn.Module) -> Tensor:
    """All trainable parameters as one float32 vector [P] (a copy)."""
    return torch.cat([p.detach().reshape(-1) for _, p in trainable(module)]).float().clone()


def set_flat(module: nn.Module, flat: Tensor) -> None:
    """Writes a vector [P] from :func:`get_flat` back into the trainable parameters."""
    params = trainable(module)
    total = sum(p.numel() for _, p in params)
    if flat.numel() != total:
        raise ValueError(f"parameter vector has {flat.numel()} entries, the model has {total} trainable ones")
    offset = 0
    with torch.no_grad():
        for _, p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


__all__ = ["CharLSTM", "WordLSTM", "build_task", "get_flat", "refuse_batchnorm", "set_flat", "trainable"]
