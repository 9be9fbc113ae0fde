"""A zoo of tiny models whose per-example gradients trip up per-sample-gradient backends (see test_sensitivity_zoo).

Each entry builds ``(net, inputs)``: ``net`` a float64 ``nn.Module`` mapping a batch to ``[B, k]``, ``inputs(n, g)``
a batch of ``n`` inputs. ``reference(net, x)`` is the forward used for the independent per-example autograd
reference (the net's own forward, except for dplit's LSTM, whose hand-written backward is replaced by plain ops).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dplit.models.lstm import LSTM

Inputs = Callable[[int, torch.Generator], Tensor]


def _floats(*shape: int) -> Inputs:
    return lambda n, g: torch.randn(n, *shape, generator=g, dtype=torch.float64)


def _ids(vocab: int, t: int) -> Inputs:
    return lambda n, g: torch.randint(0, vocab, (n, t), generator=g)


def _mlp(d_in: int = 4, hidden: int = 5, d_out: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


class LoRALinear(nn.Linear):
    """An ``nn.Linear`` subclass with a low-rank adapter: ``W x + b + B A x`` (weight frozen, adapter trainable)."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__(d_in, d_out)
        self.lora_a = nn.Parameter(torch.randn(rank, d_in) * 0.5)
        self.lora_b = nn.Parameter(torch.randn(d_out, rank) * 0.5)
        self.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias) + x @ self.lora_a.T @ self.lora_b.T


class LoRAModules(nn.Module):
    """A LoRA adapter as separate modules around a frozen Linear: ``base(x) + up(down(x))``."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2) -> None:
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.up(self.down(x))


class Scale(nn.Module):
    """A leaf module with a bare learnable parameter: ``x * gamma``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class ScaledLinear(nn.Module):
    """A bare parameter on a module that also has a child layer: ``fc(x) * gamma``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, d_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x) * self.gamma


class TiedLM(nn.Module):
    """Embedding whose weight is also the output layer's weight (``head.weight is emb.weight``)."""

    def __init__(self, vocab: int = 7, dim: int = 3) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)).mean(1))


class FunctionalTiedLM(nn.Module):
    """An Embedding whose weight is reused OUTSIDE any module (``h @ emb.weight.T + bias``, a bare bias parameter),
    as tied decoders are often written (e.g. dplit.federated's WordLSTM): no hook of the head sees the second use."""

    def __init__(self, vocab: int = 7, dim: int = 3, bias: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.bias = nn.Parameter(torch.randn(vocab) * 0.1) if bias else None

    def forward(self, ids: Tensor) -> Tensor:
        out = torch.tanh(self.emb(ids)).mean(1) @ self.emb.weight.t()
        return out if self.bias is None else out + self.bias


class Twice(nn.Module):
    """One Linear applied twice in a forward: ``head(tanh(fc(tanh(fc(x)))))``."""

    def __init__(self, dim: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class EmbeddingBagOfWords(nn.Module):
    def __init__(self, vocab: int = 7, dim: int = 3, d_out: int = 3, **options: Any) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, **options)
        self.head = nn.Linear(dim, d_out)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(ids)).mean(1))


class ConvNet(nn.Module):
    def __init__(self, padding_mode: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:  # x [B, 2, 4, 4]
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class LSTMNet(nn.Module):
    """dplit's LSTM as BiLSTMClassifier builds it (2 layers, bidirectional), final states -> Linear."""

    def __init__(self, d_in: int = 3, hidden: int = 2, d_out: int = 3) -> None:
        super().__init__()
        self.lstm = LSTM(d_in, hidden, num_layers=2, bidirectional=True)
        self.head = nn.Linear(2 * hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, in]
        return self.head(self.lstm(x)[1])

    def reference(self, x: Tensor) -> Tensor:
        """The same function in plain autograd ops (gate order i, f, o, g; direction 1 runs backwards in time)."""
        out = x
        for ih, hh in zip(self.lstm.ih, self.lstm.hh):
            d_n, four_h, h_dim = hh.weight.shape
            xp = ih(out).view(len(x), x.shape[1], d_n, four_h)
            dirs = []
            for d in range(d_n):
                h, c = xp.new_zeros(len(x), h_dim), xp.new_zeros(len(x), h_dim)
                hs: list[Tensor] = [xp] * x.shape[1]
                for t in range(x.shape[1]) if d == 0 else reversed(range(x.shape[1])):
                    z = xp[:, t, d] + h @ hh.weight[d].T
                    i, f, o = torch.sigmoid(z[:, : 3 * h_dim]).chunk(3, 1)
                    c = f * c + i * torch.tanh(z[:, 3 * h_dim :])
                    h = o * torch.tanh(c)
                    hs[t] = h
                dirs.append(torch.stack(hs, 1))
            out = torch.cat(dirs, -1)
        h_dim = self.lstm.hidden_size
        return self.head(torch.cat([out[:, -1, :h_dim], out[:, 0, h_dim:]], 1))


class TinyBlock(nn.Module):
    """A pre-LN transformer block from Linear/LayerNorm pieces (single head), mean-pooled -> Linear."""

    def __init__(self, dim: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, d_out)

    def forward(self, x: Tensor) -> Tensor:  # x [B, T, dim]
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v))
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


class TorchEncoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (batch_first, no dropout), mean-pooled -> Linear."""

    def __init__(self, dim: int = 4, d_out: int = 3) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x).mean(1))


def _frozen_weight_bias() -> nn.Module:
    net = _mlp()
    net[2].weight.requires_grad_(False)  # a trainable bias under a frozen weight
    return net


def _bitfit() -> nn.Module:
    net = _mlp()
    for m in net:
        if isinstance(m, nn.Linear):
            m.weight.requires_grad_(False)
    return net


def _norm(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), norm, nn.Tanh(), nn.Linear(6, 3))


ZOO: dict[str, tuple[Callable[[], nn.Module], Inputs]] = {
    "frozen_weight_bias": (_frozen_weight_bias, _floats(4)),
    "bitfit": (_bitfit, _floats(4)),
    "lora_subclass": (lambda: nn.Sequential(LoRALinear(4, 5), nn.Tanh(), nn.Linear(5, 3)), _floats(4)),
    "lora_modules": (lambda: nn.Sequential(LoRAModules(4, 5), nn.Tanh(), nn.Linear(5, 3)), _floats(4)),
    "scale_leaf": (lambda: nn.Sequential(nn.Linear(4, 5), Scale(5), nn.Tanh(), nn.Linear(5, 3)), _floats(4)),
    "scale_parent": (lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), ScaledLinear(4, 3)), _floats(4)),
    "tied_embedding": (TiedLM, _ids(7, 4)),
    "functional_tied": (FunctionalTiedLM, _ids(7, 4)),
    "functional_tied_nobias": (lambda: FunctionalTiedLM(bias=False), _ids(7, 4)),
    "linear_twice": (Twice, _floats(4)),
    **{
        f"conv_{mode}": ((lambda m=mode: ConvNet(m)), _floats(2, 4, 4))
        for mode in ("zeros", "reflect", "replicate", "circular")
    },
    "layernorm": (lambda: _norm(nn.LayerNorm(6)), _floats(4)),
    "groupnorm": (lambda: _norm(nn.GroupNorm(2, 6)), _floats(4)),
    "rmsnorm": (lambda: _norm(nn.RMSNorm(6)), _floats(4)),
    "embedding": (EmbeddingBagOfWords, _ids(7, 4)),
    "embedding_padding_idx": (lambda: EmbeddingBagOfWords(padding_idx=0), _ids(3, 4)),  # token 0 in most examples
    "embedding_grad_by_freq": (lambda: EmbeddingBagOfWords(scale_grad_by_freq=True), _ids(3, 4)),
    "lstm": (LSTMNet, _floats(5, 3)),
    "transformer_block": (TinyBlock, _floats(3, 4)),
    "torch_encoder_layer": (TorchEncoder, _floats(3, 4)),
}


def build(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ZOO[name][0]().double()


def reference_forward(net: nn.Module, x: Tensor) -> Tensor:
    ref = getattr(net, "reference", None)
    return ref(x) if ref is not None else net(x)
