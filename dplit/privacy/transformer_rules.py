"""Per-example gradient rules for transformer layers, tied input/output embeddings and multi-row privacy units.

Layers (exact type, matched by class path so that importing this module does not import transformers):

* GPT-2's ``transformers.pytorch_utils.Conv1D``: ``y = x W + b`` with ``W`` ``[in, out]``; each example's weight
  gradient is ``sum_t a_t g_t^T`` (the transpose of ``nn.Linear``'s), its norm by the ghost-norm identity;
* Llama's ``LlamaRMSNorm`` (weight only): ``y = w * x / sqrt(mean(x^2) + eps)``; each example's weight gradient is
  ``sum_t g_t * xhat_t`` ``[H]``, materialised (it is as small as the weight);
* ``nn.LayerNorm`` (weight, optional bias): ``xhat = (x - mean) / sqrt(var + eps)`` over ``normalized_shape``.

Each rule serves book-keeping (:data:`BOOKKEEPING`: squared norms and the clipped sum written into ``p.grad``)
and Opacus (``register_opacus_rules``: grad samplers for hooks / ghost, and a ghost norm sampler for ``Conv1D``),
replacing Opacus' ``torch.func`` fallback, which is exact but materialises every layer's per-example gradients.

Tied weights (:func:`tied_reason`, :func:`tied_cross_sq`): an ``nn.Embedding`` whose weight is also the weight
of a bias-free ``nn.Linear`` output head (GPT-2, SmolLM2). The example's gradient of the shared weight is
``G = G_emb + G_head``; its squared norm is ``|G_emb|^2 + |G_head|^2 + 2 <G_emb, G_head>``, and the cross term
needs no ``[V, D]`` per-example tensor: ``<G_head, G_emb> = sum_{s,t} g_head[s, id_t] (a_s . g_emb_t)``.

Units (:func:`to_units`): a privacy unit of K consecutive rows (unit-major) is clipped on the MEAN of its rows'
gradients. For layers whose per-example gradient is a sum over positions, that is a per-example gradient over the
K*T positions of the unit: the captured ``[n, T, ...]`` tensors are reshaped to ``[n/K, K*T, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

CONV1D = ("transformers.pytorch_utils", "Conv1D")
LLAMA_RMSNORM = ("transformers.models.llama.modeling_llama", "LlamaRMSNorm")


def _key(m: nn.Module) -> tuple[str, str]:
    return type(m).__module__, type(m).__qualname__


def seq_sq_norm(a3: Tensor, g3: Tensor) -> Tensor:
    """Squared norms ``[n]`` of ``sum_t g_t a_t^T`` for ``a3`` [n, T, in], ``g3`` [n, T, out] (ghost identity when
    ``T^2`` is below the weight size, else the materialised per-example gradient)."""
    t_len = a3.shape[1]
    if t_len * t_len <= a3.shape[2] * g3.shape[2]:
        return (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g3.transpose(1, 2), a3).flatten(1).pow(2).sum(1)


def normalized(m: nn.Module, x: Tensor) -> Tensor:
    """``xhat`` of a LlamaRMSNorm / LayerNorm input ``x`` [n, ..., H], as the layer's forward computes it."""
    if isinstance(m, nn.LayerNorm):  # the layer's own fused kernel, without its affine part
        return nn.functional.layer_norm(x, m.normalized_shape, None, None, m.eps)
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)).to(x.dtype)  # type: ignore[operator]


def _norm_width(m: nn.Module) -> int:
    return math.prod(m.normalized_shape) if isinstance(m, nn.LayerNorm) else int(m.weight.shape[-1])  # type: ignore[index]


def per_example_grads(m: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-example gradients of the trainable parameters of a norm layer or ``Conv1D``, ``{name: [n, *shape]}``
    from its input ``a`` [n, ..., in] and output gradient ``g`` [n, ..., out]. ``Conv1D`` weights: [n, in, out]."""
    n = len(a)
    out: dict[str, Tensor] = {}
    weight: Any = m.weight
    bias: Any = getattr(m, "bias", None)
    if _key(m) == CONV1D:
        if weight.requires_grad:
            out["weight"] = torch.bmm(a.reshape(n, -1, a.shape[-1]).transpose(1, 2), g.reshape(n, -1, g.shape[-1]))
    elif weight is not None and weight.requires_grad:
        width = _norm_width(m)
        xg = (normalized(m, a) * g).reshape(n, -1, width).sum(1)
        out["weight"] = xg.reshape(n, *weight.shape)
    if isinstance(bias, Tensor) and bias.requires_grad:
        out["bias"] = g.reshape(n, -1, math.prod(bias.shape)).sum(1).reshape(n, *bias.shape)
    return out


def _conv1d_sq_norm(m: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    n = len(a)
    a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    sq = seq_sq_norm(a3, g3) if m.weight.requires_grad else g.new_zeros(n)  # type: ignore[union-attr]
    bias = m.bias
    return sq + g3.sum(1).pow(2).sum(1) if isinstance(bias, Tensor) and bias.requires_grad else sq


def _small_sq_norm(m: nn.Module, a: Tensor, g: Tensor) -> Tensor:
    grads = per_example_grads(m, a, g)
    return sum((t.flatten(1).pow(2).sum(1) for t in grads.values()), g.new_zeros(len(a)))


def _conv1d_write(m: nn.Module, a: Tensor, g: Tensor, coef: Tensor) -> None:
    n = len(a)
    gc = (g.reshape(n, -1, g.shape[-1]) * coef[:, None, None]).flatten(0, 1)  # [n*T, out]
    weight: Any = m.weight
    bias: Any = m.bias
    if weight.requires_grad:
        weight.grad = (a.reshape(-1, a.shape[-1]).T @ gc).to(weight.dtype)  # [in, out]
    if isinstance(bias, Tensor) and bias.requires_grad:
        bias.grad = gc.sum(0).to(bias.dtype)


def _small_write(m: nn.Module, a: Tensor, g: Tensor, coef: Tensor) -> None:
    for name, t in per_example_grads(m, a, g).items():
        p = getattr(m, name)
        p.grad = torch.einsum("n,n...->...", coef.to(t.dtype), t).to(p.dtype)


@dataclass(frozen=True)
class BookKeepingRule:
    """A book-keeping rule: ``sq_norm(m, a, g) -> [n]`` and ``write(m, a, g, coef)`` (``p.grad`` := clipped sum).

    ``per_example`` (layers whose per-example gradients are as small as their parameters): ``{name: [n, *shape]}``,
    formed once per step by book-keeping, which then takes norms and the clipped sum from them.
    """

    params: tuple[str, ...]
    sq_norm: Callable[[nn.Module, Tensor, Tensor], Tensor]
    write: Callable[[nn.Module, Tensor, Tensor, Tensor], None]
    per_example: Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]] | None = None


_CONV1D_RULE = BookKeepingRule(("weight", "bias"), _conv1d_sq_norm, _conv1d_write)
_NORM_RULE = BookKeepingRule(("weight", "bias"), _small_sq_norm, _small_write, per_example_grads)
BOOKKEEPING: dict[tuple[str, str], BookKeepingRule] = {
    CONV1D: _CONV1D_RULE,
    LLAMA_RMSNORM: BookKeepingRule(("weight",), _small_sq_norm, _small_write, per_example_grads),
    ("torch.nn.modules.normalization", "LayerNorm"): _NORM_RULE,
}


def bookkeeping_rule(m: nn.Module) -> BookKeepingRule | None:
    """The rule of a module of exactly one of the types above (a subclass has none), or None."""
    return BOOKKEEPING.get(_key(m))


# ---- tied input / output embeddings -------------------------------------------------------------------------


def tied_reason(owners: list[nn.Module]) -> str | None:
    """None if book-keeping forms the exact per-example norm of a weight shared by ``owners``, else why not."""
    kinds = sorted(type(m).__name__ for m in owners)
    if len(owners) != 2 or kinds != ["Embedding", "Linear"] or any(type(m) not in (nn.Embedding, nn.Linear)
                                                                   for m in owners):  # fmt: skip
        return "only an nn.Embedding tied to one nn.Linear output head is supported"
    return None


def tied_cross_sq(emb: nn.Embedding, e_emb: dict[str, Tensor], e_head: dict[str, Tensor]) -> Tensor:
    """``2 <G_emb, G_head>`` per example ``[n]`` for the shared weight ``[V, D]`` of ``emb`` and a Linear head.

    ``e_emb``: ids ``a`` [n, T], output gradient ``g`` [n, T, D]; ``e_head``: input ``a`` [n, S, D], output
    gradient ``g`` [n, S, V]. ``G_head[v] = sum_s g_head[s, v] a_s`` and ``G_emb[v] = sum_{t: id_t = v} g_emb_t``.
    """
    n = len(e_emb["a"])
    ids = e_emb["a"].reshape(n, -1)  # [n, T]
    g_emb = e_emb["g"].reshape(n, ids.shape[1], -1)  # [n, T, D]
    if emb.padding_idx is not None:
        g_emb = g_emb * (ids != emb.padding_idx)[..., None]
    a_head = e_head["a"].reshape(n, -1, g_emb.shape[-1])  # [n, S, D]
    g_head = e_head["g"].reshape(n, a_head.shape[1], -1)  # [n, S, V]
    picked = g_head.gather(2, ids[:, None, :].expand(n, a_head.shape[1], ids.shape[1]))  # [n, S, T]
    return 2 * (picked * torch.bmm(a_head, g_emb.transpose(1, 2))).sum((1, 2))


# ---- multi-row privacy units --------------------------------------------------------------------------------


def to_units(m: nn.Module, e: dict[str, Tensor], k: int, lstm: bool = False) -> dict[str, Tensor]:
    """The captured ``a``/``g`` of ``n = U*K`` unit-major rows as ``U`` examples of ``K*T`` positions each.

    ``lstm``: dplit LSTM captures ``[D, B, T, .]`` (batch in dim 1). Layers whose per-example gradient is not a sum
    over positions of the captured tensors (Conv2d) are refused by the caller.
    """
    if lstm:
        return {key: t.reshape(t.shape[0], t.shape[1] // k, -1, t.shape[-1]) for key, t in e.items()}
    a, g = e["a"], e["g"]
    u = len(a) // k
    if isinstance(m, nn.Embedding):
        return {"a": a.reshape(u, -1), "g": g.reshape(u, -1, g.shape[-1])}
    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)
        return {"a": a.reshape(u, -1, *shape), "g": g.reshape(u, -1, *shape)}
    return {"a": a.reshape(u, -1, a.shape[-1]), "g": g.reshape(u, -1, g.shape[-1])}


# ---- Opacus (hooks, ghost) ----------------------------------------------------------------------------------


def _opacus_grad_sample(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[Any, Tensor]:
    """Opacus rule: per-example gradients (``backprops`` already carry the loss-reduction factor)."""
    grads = per_example_grads(layer, activations[0].to(backprops.dtype), backprops)
    return {getattr(layer, name): t for name, t in grads.items()}


def _opacus_conv1d_norm(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> dict[Any, Tensor]:
    """Opacus ghost rule for ``Conv1D``: per-example gradient norms ``[n]`` of each trainable parameter."""
    a, g = activations[0].to(backprops.dtype), backprops
    n = len(a)
    a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])
    out: dict[Any, Tensor] = {}
    if layer.weight.requires_grad:  # type: ignore[union-attr]
        out[layer.weight] = seq_sq_norm(a3, g3).clamp(min=0).sqrt()
    bias = layer.bias
    if isinstance(bias, Tensor) and bias.requires_grad:
        out[bias] = g3.sum(1).norm(dim=1)
    return out


def register_opacus_rules(module: nn.Module) -> None:
    """Register the Opacus rules of the transformer layer types found in ``module`` (idempotent)."""
    from opacus.grad_sample import GradSampleModule, GradSampleModuleFastGradientClipping

    for t in {type(m) for m in module.modules()}:
        key = (t.__module__, t.__qualname__)
        if key in (CONV1D, LLAMA_RMSNORM):
            GradSampleModule.GRAD_SAMPLERS[t] = _opacus_grad_sample
        if key == CONV1D:
            GradSampleModuleFastGradientClipping.NORM_SAMPLERS[t] = _opacus_conv1d_norm


__all__ = [
    "BOOKKEEPING",
    "BookKeepingRule",
    "bookkeeping_rule",
    "per_example_grads",
    "register_opacus_rules",
    "tied_cross_sq",
    "tied_reason",
    "to_units",
]
