"""Per-example ``nn.Conv2d`` weight gradients from a layer's captured input and output gradient.

Each example's weight gradient is ``dW_i[o, c, p, q] = sum_{y, x} g_i[o, y, x] * a_i[c, y*s + p*d, x*s + q*d]`` (per
group). It is formed as one batched product of the output gradients ``[n, G, out/G, L]`` with the input patches
``[n, G, in/G*kh*kw, L]``; the patches are copied from a strided view of the (padded) input, which is up to 2x
cheaper on CPU than ``unfold`` (``im2col``). The alternative, one grouped convolution weight-gradient
(``torch.nn.grad.conv2d_weight`` with the batch as ``n*G`` groups), is kept as an independent check and for
benchmarks (``scripts/bench_conv_grads.py``); both are exact (the same sums, in a different order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.functional import pad
from torch.nn.grad import conv2d_weight


def padded_input(m: nn.Conv2d, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The input as the layer's convolution sees it, and the zero padding still to apply (``padding`` as ints).

    A non-``zeros`` ``padding_mode`` or a string ``padding`` ("same", "valid") is applied here, as the layer's
    forward applies it (``_reversed_padding_repeated_twice``); integer zero padding is left to the caller.
    """
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return pad(a, m._reversed_padding_repeated_twice, mode=mode), (0, 0)
    ph, pw = m.padding  # type: ignore[misc]
    return a, (int(ph), int(pw))


def patches(m: nn.Conv2d, a: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """Input patches ``[n, G, in/G*kh*kw, Ho*Wo]`` (contiguous) of input ``a`` [n, in, H, W] for layer ``m``."""
    a, (ph, pw) = padded_input(m, a)
    if ph or pw:
        a = pad(a, (pw, pw, ph, ph))
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    ho, wo = out_hw
    n, c = a.shape[:2]
    # windows of the dilated kernel's extent, every stride; then every dilation-th element of each window
    view = a.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]  # [n,c,Ho',Wo',kh,kw]
    view = view[:, :, :ho, :wo]
    g = m.groups
    return view.permute(0, 1, 4, 5, 2, 3).reshape(n, g, c // g * kh * kw, ho * wo)


def per_example_weight_grads(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, method: str = "patches") -> torch.Tensor:
    """Each example's weight gradient, ``[n, out, in/groups*kh*kw]`` (``m.weight`` flattened after dim 0).

    Args:
        m: the layer (its stride, padding, padding_mode, dilation and groups are honoured).
        a: the layer's input ``[n, in, H, W]``.
        g: the gradient of the loss with respect to the layer's output ``[n, out, Ho, Wo]``.
        method: ``"patches"`` (strided copy + batched product) or ``"grouped"`` (one grouped convolution weight
            gradient). On MnistCNN's layers (``scripts/bench_conv_grads.py``, 1 CPU thread) ``patches`` is 1.3-1.8x
            faster than ``unfold`` + ``bmm`` on conv1 and ``grouped`` no faster anywhere: ``patches`` is used.
    """
    n, out = g.shape[:2]
    ho, wo = g.shape[2:]
    groups = m.groups
    if method == "patches":
        cols = patches(m, a, (ho, wo))  # [n, G, D, L]
        gg = g.reshape(n, groups, out // groups, ho * wo)  # [n, G, out/G, L]
        return torch.matmul(gg, cols.transpose(2, 3)).reshape(n, out, -1)
    if method != "grouped":
        raise ValueError(f"per_example_weight_grads: method must be 'patches' or 'grouped', not {method!r}")
    a, padding = padded_input(m, a)
    c = a.shape[1]
    shape = (n * out, c // groups, *m.kernel_size)
    gw = conv2d_weight(
        a.reshape(1, n * c, *a.shape[2:]),
        shape,
        g.reshape(1, n * out, ho, wo),
        stride=m.stride,
        padding=padding,
        dilation=m.dilation,
        groups=n * groups,
    )
    return gw.reshape(n, out, -1)


CHUNK_BYTES = 8 << 20
"""Units per chunk: about this many bytes of input patches and per-example weight gradients at a time."""


@dataclass
class ConvPerExample:
    """One Conv2d layer's per-unit quantities for clipping (``n`` units of ``rows_per_unit`` rows each; a unit is one
    example unless augmentation multiplicity makes it K rows).

    ``sq``: squared gradient norms ``[n]`` over the layer's trainable parameters; ``weight``: the per-unit weight
    gradients ``[n, out, in/G*kh*kw]`` when kept, None when the clipped sum is recomputed from the captures (or the
    weight is frozen); ``bias``: per-unit bias gradients ``[n, out]`` (None: no trainable bias).
    """

    sq: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    recompute: bool
    rows_per_unit: int = 1
    deferred: bool = False
    """The weight's norms are not in ``sq`` yet: :func:`clip_deferred` forms them and the clipped sum in one pass."""


def conv_per_example(
    m: nn.Conv2d,
    a: torch.Tensor,
    g: torch.Tensor,
    keep: bool | None = None,
    rows_per_unit: int = 1,
    defer: bool = False,
) -> ConvPerExample:
    """Squared per-example gradient norms of ``m``'s trainable parameters, and what the clipped sum needs.

    ``a`` [n, in, H, W] is the layer's input and ``g`` [n, out, Ho, Wo] the gradient of its output (as captured).
    The per-example weight gradients are formed in chunks of examples; they are kept (``keep``; None: when they are
    no larger than the captures ``a`` and ``g``, which the caller may then drop) or else only their norms are, and
    :func:`write_clipped` forms the clipped sum as one weight gradient of the coefficient-scaled ``g`` (the same sum
    by linearity, at the cost of a second product): peak memory is then the captures plus one chunk.

    Ghost norms: for an ungrouped layer whose output has few positions ``L`` (1x1 convolutions of small feature
    maps, the last blocks of a CNN), ``||dW_i||^2 = sum_{l,l'} (p_l . p_l')(g_l . g_l')`` over the example's input
    patches ``p`` and output gradients ``g`` costs ``L^2 (D + out)`` instead of ``L D out`` for the gradient itself
    (``D`` = in*kh*kw); it is used when cheaper and ``keep`` is not True (the clipped sum is then recomputed).

    Privacy units of ``rows_per_unit`` = K consecutive rows (augmentation multiplicity, unit-major): a unit's weight
    gradient is the sum of its rows' (a conv gradient is a sum over output positions, so a unit is one example of
    K*L positions); norms, kept gradients and bias gradients are per unit ``[n / K]``.

    ``defer``: where the weight's clipped sum would be recomputed from per-example gradients formed for their norms
    only (neither kept nor ghost), form nothing here: ``deferred`` is set and :func:`clip_deferred` later forms each
    chunk's per-example gradients once, for their norms and their clipped sum (no recomputation).
    """
    k = rows_per_unit
    if k < 1 or len(a) % k:
        raise ValueError(f"conv_per_example: {len(a)} rows are not units of {k} rows")
    n, out = g.shape[:2]
    units = n // k
    sq = g.new_zeros(units)
    weight = None
    train_weight = bool(m.weight.requires_grad)
    positions, d = g[0, 0].numel(), m.weight[0].numel()
    ghost = keep is not True and m.groups == 1 and k * positions * (d + out) < out * d
    if keep is None:
        keep = not ghost and units * out * d <= a.numel() + g.numel()
    deferred = defer and train_weight and not ghost and not keep
    if train_weight and not deferred:
        weight = g.new_empty(units, out, d) if keep else None
        for i in range(0, units, step := _chunk_units(m, a, g, k)):
            rows = slice(i * k, min(units, i + step) * k)
            c = min(units, i + step) - i
            if ghost:  # a unit's K*L positions: [c, D, K*L] and [c, out, K*L]
                cols = patches(m, a[rows], (g.shape[2], g.shape[3]))[:, 0]  # [c*K, D, L]
                cols = cols.reshape(c, k, d, -1).transpose(1, 2).reshape(c, d, -1)
                gc = g[rows].flatten(2).reshape(c, k, out, -1).transpose(1, 2).reshape(c, out, -1)
                gram = torch.matmul(cols.transpose(1, 2), cols) * torch.matmul(gc.transpose(1, 2), gc)  # [c, KL, KL]
                sq[i : i + c] = gram.sum((1, 2))
                continue
            w = _unit_grads(m, a[rows], g[rows], k)  # [c, out, D]
            sq[i : i + c] = torch.linalg.vector_norm(w.flatten(1), dim=1).square()
            if weight is not None:
                weight[i : i + c] = w
    bias = g.flatten(2).sum(2) if m.bias is not None and m.bias.requires_grad else None
    if bias is not None:
        if k > 1:
            bias = bias.reshape(units, k, out).sum(1)
        sq += bias.square().sum(1)
    recompute = train_weight and not keep and not deferred
    return ConvPerExample(sq, weight, bias, recompute=recompute, rows_per_unit=k, deferred=deferred)


def _chunk_units(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, k: int) -> int:
    """Units per chunk: about ``CHUNK_BYTES`` of input patches (a unit's K rows of ``D * G`` values a position) and
    per-row weight gradients (``out * D`` values a row)."""
    d = m.weight[0].numel()
    per_unit_bytes = k * d * (m.groups * g[0, 0].numel() + m.weight.shape[0]) * a.element_size()
    return max(1, CHUNK_BYTES // max(1, per_unit_bytes))


def _unit_grads(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    """Weight gradients ``[c, out, D]`` of the ``c`` units of ``k`` consecutive rows in ``a`` / ``g``."""
    w = per_example_weight_grads(m, a, g)  # [c*K, out, D]
    return w.reshape(len(a) // k, k, *w.shape[1:]).sum(1) if k > 1 else w


def clip_deferred(
    layers: list[tuple[nn.Conv2d, torch.Tensor, torch.Tensor]],
    sq_norms: torch.Tensor,
    scale: float,
    coef_of: Callable[[torch.Tensor, slice], torch.Tensor],
    rows_per_unit: int = 1,
) -> torch.Tensor | None:
    """The deferred Conv2d weights (``ConvPerExample.deferred``): norms and clipped sums in one pass over chunks.

    ``layers``: each deferred layer with its captured input and output gradient, which are ``1 / scale`` of each
    unit's own (a mean loss over ``scale`` units): norms and sums are of ``scale`` times the formed gradients.
    ``sq_norms`` [units] (float64) holds every other parameter's squared norms (already whole); each chunk's weight
    norms are added in place, so on return it is the whole model's. A unit's clip factor depends on its own norm
    (and group) only (``coef_of``: a chunk's [c] norms and its units' slice -> [c] factors), so a chunk's clipped
    sum is final once its norms are complete: ``weight.grad = sum over chunks of (scale * factors) @ grads``. Peak
    memory is the captures plus one chunk of every layer's gradients, as with recomputation, at half the products.
    Returns the factors used ``[units]`` (None: no layer), for the caller to check against the batch's.
    """
    if not layers:
        return None
    k = rows_per_unit
    units = len(layers[0][1]) // k
    step = max(1, min(_chunk_units(m, a, g, k) for m, a, g in layers) // len(layers))
    sums = [torch.zeros(m.weight.shape[0], m.weight[0].numel(), dtype=g.dtype, device=g.device) for m, _, g in layers]
    used = []
    for i in range(0, units, step):
        c = min(units, i + step) - i
        rows = slice(i * k, (i + c) * k)
        grads = [_unit_grads(m, a[rows], g[rows], k).flatten(1) for m, a, g in layers]  # [c, out*D] each
        for w in grads:
            sq_norms[i : i + c] += torch.linalg.vector_norm(w, dim=1).square().double() * (scale * scale)
        coef = coef_of(sq_norms[i : i + c].clamp(min=0).sqrt(), slice(i, i + c))
        used.append(coef)
        for total, w in zip(sums, grads, strict=True):
            total.view(-1).addmv_(w.T, coef.to(w.dtype) * scale)
    for (m, _, _), total in zip(layers, sums, strict=True):
        m.weight.grad = total.reshape_as(m.weight).to(m.weight.dtype)
    return torch.cat(used)


def recompute_weight(m: nn.Conv2d, a: torch.Tensor, g: torch.Tensor, coef: torch.Tensor, rows_per_unit: int) -> None:
    """``m.weight.grad`` = the weight gradient of the layer for the output gradient ``coef[i] * g_r`` of each row
    ``r`` of unit ``i``: the clipped sum (exact: a per-example gradient is linear in g)."""
    x, padding = padded_input(m, a)
    rows = coef.to(g.dtype).repeat_interleave(rows_per_unit)
    gc = g * rows.view(-1, 1, 1, 1)
    w = conv2d_weight(x, m.weight.shape, gc, stride=m.stride, padding=padding, dilation=m.dilation, groups=m.groups)
    m.weight.grad = w.to(m.weight.dtype)


def write_clipped(
    m: nn.Conv2d, per: ConvPerExample, a: torch.Tensor | None, g: torch.Tensor | None, coef: torch.Tensor
) -> None:
    """``p.grad = sum_i coef[i] * grad_i`` (``p``'s shape and dtype) over the units ``i`` (``coef`` [units]) for the
    layer's trainable parameters.

    ``a`` and ``g`` (the captures) are needed only when ``per.recompute``: the weight's clipped sum is then the weight
    gradient of the layer for the output gradient ``coef[i] * g_r`` of each row ``r`` of unit ``i`` (exact: the
    per-example gradient is linear in g).
    """
    if per.weight is not None:
        m.weight.grad = (coef.to(per.weight.dtype) @ per.weight.flatten(1)).reshape_as(m.weight).to(m.weight.dtype)
    elif per.recompute:
        assert a is not None and g is not None
        recompute_weight(m, a, g, coef, per.rows_per_unit)
    if per.bias is not None and m.bias is not None:
        m.bias.grad = (coef.to(per.bias.dtype) @ per.bias).to(m.bias.dtype)


__all__ = [
    "ConvPerExample",
    "clip_deferred",
    "conv_per_example",
    "padded_input",
    "patches",
    "per_example_weight_grads",
    "write_clipped",
]
