"""Book-keeping's rules for its built-in layer types: per-example squared gradient norms and clipped sums.

Each rule reads a layer's captures ``e`` (``"a"``: the layer input, ``"g"``: the gradient of the loss with respect to
its output; LSTMScan: hidden states and gate gradients) and writes ``p.grad`` of the layer's trainable parameters.
``nn.Linear`` (any leading dims: ghost norms over the sequence when ``T^2`` is below the weight size, the
materialised per-example gradient otherwise), ``nn.Conv2d`` (per-example gradients, :mod:`dplit.privacy.conv_grads`),
``nn.GroupNorm`` (affine parameters, per example from each row's own normalisation), ``nn.Embedding`` (sparse
per-example norms over each example's distinct tokens; the clipped sum an ``index_add``),
:class:`dplit.models.lstm.LSTMScan`, and the rules of :mod:`dplit.privacy.transformer_rules` (GPT-2 ``Conv1D``,
``LlamaRMSNorm``, ``nn.LayerNorm``). Used by :class:`dplit.privacy.bookkeeping.BookKeeping`.
"""

from __future__ import annotations

import torch
from torch import nn

from dplit.models.lstm import LSTMScan
from dplit.privacy import conv_grads
from dplit.privacy.transformer_rules import bookkeeping_rule


def per_example(
    m: nn.Module, e: dict[str, torch.Tensor], rows_per_unit: int = 1, defer: bool = False
) -> conv_grads.ConvPerExample | None:
    """Conv2d: its per-unit norms and gradients (:func:`dplit.privacy.conv_grads.conv_per_example`; a unit is
    ``rows_per_unit`` consecutive rows), its captures dropped from ``e`` when the clipped sum no longer needs them.
    GroupNorm and the norm rules of :mod:`dplit.privacy.transformer_rules` (per-example gradients as small as the
    parameters): ``e`` becomes those gradients, formed once (``STASH`` keys); None. Other layers: None.
    ``defer``: a Conv2d's weight may be left to :func:`dplit.privacy.conv_grads.clip_deferred` (its ``deferred``)."""
    grads = None
    if isinstance(m, nn.GroupNorm):
        grads = groupnorm_grads(m, e["a"], e["g"], rows_per_unit)
    elif (rule := bookkeeping_rule(m)) is not None and rule.per_example is not None:
        grads = rule.per_example(m, e["a"], e["g"])  # units: already [U, K*T, ...] (to_units)
    if grads is not None:
        e.clear()
        e.update({STASH + name: t for name, t in grads.items()})
        return None
    if not isinstance(m, nn.Conv2d):
        return None
    per = conv_grads.conv_per_example(m, e["a"], e["g"], rows_per_unit=rows_per_unit, defer=defer)
    if not (per.recompute or per.deferred):
        e.clear()  # free the layer's input and output gradient now (the largest captures of a CNN)
    return per


def sq_norm(m: nn.Module, e: dict[str, torch.Tensor], per: conv_grads.ConvPerExample | None) -> torch.Tensor:
    """Squared norms ``[n]`` of each example's gradient over the layer's trainable parameters (``per``: see
    ``per_example``). Per example of the captured (mean-loss) gradients: the caller rescales by ``n^2``."""
    if per is not None:
        return per.sq
    if _stashed(e):  # e: the layer's per-unit gradients (per_example)
        return sum(t.flatten(1).pow(2).sum(1) for t in e.values())  # type: ignore[return-value]
    if rule := bookkeeping_rule(m):
        return rule.sq_norm(m, e["a"], e["g"])
    if isinstance(m, nn.Embedding):
        return embedding_sq_norm(m, e["a"], e["g"])
    if isinstance(m, LSTMScan):
        a4, g4 = e["a"], e["g"]  # [D, B, T, H], [D, B, T, 4H]
        d, nb, t_len = a4.shape[:3]
        a3, g3 = a4.reshape(d * nb, t_len, -1), g4.reshape(d * nb, t_len, -1)  # views
        return seq_sq_norm(a3, g3).view(d, nb).sum(0)
    a, g = e["a"], e["g"]
    n = len(a)
    train_bias = m.bias is not None and m.bias.requires_grad
    g3 = g.reshape(n, -1, g.shape[-1])  # [n, T, out]
    sq = seq_sq_norm(a.reshape(n, -1, a.shape[-1]), g3) if m.weight.requires_grad else g.new_zeros(n)
    return sq + g3.sum(1).pow(2).sum(1) if train_bias else sq


def write_clipped(
    m: nn.Module, e: dict[str, torch.Tensor], per: conv_grads.ConvPerExample | None, coef: torch.Tensor
) -> None:
    """``p.grad = sum_i coef[i] * grad_i`` for each trainable parameter ``p`` of the layer (``coef`` [n])."""
    if per is not None:
        assert isinstance(m, nn.Conv2d)
        return conv_grads.write_clipped(m, per, e.get("a"), e.get("g"), coef)
    if _stashed(e):
        for key, t in e.items():
            p = getattr(m, key.removeprefix(STASH))
            p.grad = torch.einsum("n,n...->...", coef.to(t.dtype), t).to(p.dtype)
        return
    if rule := bookkeeping_rule(m):
        return rule.write(m, e["a"], e["g"], coef)
    if isinstance(m, nn.Embedding):
        ids, g = e["a"], e["g"]
        rows = (g * coef[:, None, None]).reshape(-1, g.shape[-1])
        if m.padding_idx is not None:
            rows = rows * (ids.reshape(-1, 1) != m.padding_idx)
        m.weight.grad = torch.zeros_like(m.weight).index_add_(0, ids.reshape(-1), rows.to(m.weight.dtype))
        return
    if isinstance(m, LSTMScan):
        a4, g4 = e["a"], e["g"]  # [D, B, T, H], [D, B, T, 4H]
        d, nb, t_len, h = a4.shape
        ac = a4 * coef[None, :, None, None]  # scale the (4x smaller) hidden states, not the gate gradients
        m.weight.grad = torch.bmm(g4.reshape(d, nb * t_len, -1).transpose(1, 2), ac.reshape(d, nb * t_len, h)).to(
            m.weight.dtype
        )
        return
    a, g = e["a"], e["g"]
    n = len(a)
    weight, bias = m.weight, m.bias
    assert isinstance(weight, torch.Tensor)
    gc = (g.reshape(n, -1, g.shape[-1]) * coef[:, None, None]).flatten(0, 1)  # [n*T, out]
    if weight.requires_grad:
        weight.grad = (gc.T @ a.reshape(-1, a.shape[-1])).to(weight.dtype)  # [out, in]
    b = gc.sum(0) if bias is not None else None
    if b is not None and isinstance(bias, torch.Tensor) and bias.requires_grad:
        bias.grad = b.to(bias.dtype)


STASH = "grad:"
"""Key prefix of the per-example gradients ``per_example`` leaves in a layer's captures in place of ``a`` / ``g``."""


def _stashed(e: dict[str, torch.Tensor]) -> bool:
    return bool(e) and all(key.startswith(STASH) for key in e)


def groupnorm_grads(
    m: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor, rows_per_unit: int = 1
) -> dict[str, torch.Tensor]:
    """Per-unit gradients ``{"weight": [n, C], "bias": [n, C]}`` of a GroupNorm's trainable affine parameters, from
    its input ``a`` [rows, C, *] and output gradient ``g``: ``xhat`` is each row's own normalisation (statistics over
    its C/G channels and positions, as the layer's forward), ``dweight_c = sum_pos g * xhat``, ``dbias_c = sum_pos
    g``; a unit of ``rows_per_unit`` consecutive rows sums its rows'."""
    rows, c = a.shape[:2]
    xhat = nn.functional.group_norm(a, m.num_groups, None, None, m.eps)  # the layer's own kernel, no affine part
    out = {}
    if m.weight is not None and m.weight.requires_grad:
        out["weight"] = (g * xhat).reshape(rows, c, -1).sum(2)
    if m.bias is not None and m.bias.requires_grad:
        out["bias"] = g.reshape(rows, c, -1).sum(2)
    k = rows_per_unit
    return {name: t.reshape(rows // k, k, c).sum(1) for name, t in out.items()}


def seq_sq_norm(a3: torch.Tensor, g3: torch.Tensor) -> torch.Tensor:
    """Squared norms ``[n]`` of ``sum_t g_t a_t^T`` for ``a3`` [n, T, in], ``g3`` [n, T, out]."""
    t_len = a3.shape[1]
    if t_len == 1:  # ||g a^T||^2 = ||g||^2 ||a||^2
        return g3[:, 0].pow(2).sum(1) * a3[:, 0].pow(2).sum(1)
    if t_len * t_len <= a3.shape[2] * g3.shape[2]:  # ghost norm: sum_{t,s} (a_t . a_s)(g_t . g_s)
        return (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g3.transpose(1, 2), a3).flatten(1).pow(2).sum(1)  # the per-example gradients themselves


def embedding_sq_norm(m: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Squared per-example gradient norms of an embedding: rows summed per (example, token), without [n, V, D]."""
    n = ids.shape[0]
    ids2 = ids.reshape(n, -1)
    g2 = g.reshape(n, ids2.shape[1], -1)
    if m.padding_idx is not None:
        g2 = g2 * (ids2 != m.padding_idx)[..., None]
    example = torch.arange(n, device=ids.device)[:, None].expand_as(ids2)
    keys = (example * m.num_embeddings + ids2).reshape(-1)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    sums = torch.zeros(len(uniq), g2.shape[-1], dtype=g2.dtype, device=g2.device)
    sums.index_add_(0, inverse, g2.reshape(-1, g2.shape[-1]))
    return torch.zeros(n, dtype=g2.dtype, device=g2.device).index_add_(0, uniq // m.num_embeddings, sums.pow(2).sum(1))


__all__ = ["embedding_sq_norm", "per_example", "seq_sq_norm", "sq_norm", "write_clipped"]
