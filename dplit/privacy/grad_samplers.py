"""Opacus per-sample-gradient rules registered by dplit (on import; the clipping backends import this module).

``nn.Embedding`` with ``padding_idx``: Opacus' rules count the padded positions' gradient, which autograd gives
no row; these wrappers mask them. dplit's LSTM rule lives in :mod:`dplit.privacy.lstm_rules`.
"""

from __future__ import annotations

from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.embedding import compute_embedding_grad_sample, compute_embedding_norm_sample
from torch import Tensor, nn


def _without_padding(layer: nn.Embedding, activations: list[Tensor], backprops: Tensor) -> Tensor:
    """Opacus' Embedding rules ignore ``padding_idx``; autograd gives that row no gradient: mask its positions."""
    if layer.padding_idx is None:
        return backprops
    return backprops * (activations[0] != layer.padding_idx).unsqueeze(-1).to(backprops.dtype)  # [B, T, D]


@register_grad_sampler(nn.Embedding)
def compute_embedding_grad_sample_padded(
    layer: nn.Embedding, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus' per-example Embedding gradients, with no gradient for the ``padding_idx`` row (as autograd)."""
    return compute_embedding_grad_sample(layer, activations, _without_padding(layer, activations, backprops))


@register_norm_sampler(nn.Embedding)
def compute_embedding_norm_sample_padded(
    layer: nn.Embedding, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Opacus' ghost norms of Embedding gradients, with no gradient for the ``padding_idx`` row (as autograd)."""
    return compute_embedding_norm_sample(layer, activations, _without_padding(layer, activations, backprops))


__all__ = [
    "compute_embedding_grad_sample_padded",
    "compute_embedding_norm_sample_padded",
]
