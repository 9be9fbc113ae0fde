"""Opacus per-sample-gradient rules for dplit's own layers (registered on import; the engine imports this module).

:class:`dplit.models.lstm.LSTMScan` keeps, during its hand-written backward, the gate gradients of every timestep;
its rule turns them into per-example gradients with one einsum (instead of one hook per timestep).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.embedding import compute_embedding_grad_sample, compute_embedding_norm_sample
from torch import Tensor, nn

from dplit.models.lstm import LSTMScan


@register_grad_sampler(LSTMScan)
def compute_lstm_scan_grad_sample(
    layer: LSTMScan, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-example gradients ``[B, D, 4H, H]`` of ``layer.weight`` from the saved gate gradients.

    Opacus passes ``backprops`` = the output gradient times its loss-reduction factor (the batch size for a mean
    loss); the saved gradients are unscaled, so the same factor is read off the ratio of the two.
    """
    saved_out = layer.saved_grad_out
    if saved_out is None or layer.saved_dz is None:
        raise RuntimeError("LSTMScan: no saved backward; the DP engine must set keep_for_dp before the forward")
    denom = saved_out.pow(2).sum()
    scale = 1.0 if denom == 0 else float(torch.round((backprops * saved_out).sum() / denom))
    grad = layer.per_example_grad() * scale
    layer.clear_saved()
    return {layer.weight: grad} if layer.weight.requires_grad else {}


def keep_for_dp(module: nn.Module, keep: bool = True) -> None:
    """Switch the saving of backward intermediates on (or off) for every :class:`LSTMScan` in ``module``."""
    for m in module.modules():
        if isinstance(m, LSTMScan):
            m.keep_for_dp = keep
            if not keep:
                m.clear_saved()


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
    "compute_lstm_scan_grad_sample",
    "keep_for_dp",
]
