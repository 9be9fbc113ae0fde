"""Which layers book-keeping clipping covers (invariant 6: every trainable parameter has a rule), and how it reads
their inputs.

A rule covers the direct parameters of a layer of one EXACT type (``RULES`` here, and the transformer layers of
:mod:`dplit.privacy.transformer_rules`): a subclass may change the forward, so it has no rule unless listed. The one
listed subclass is timm's ``Conv2dSame`` (TensorFlow "SAME" padding, used by the ``tf_*`` EfficientNets): its forward
pads the input with timm's ``pad_same`` for the input's size and then runs the layer's own unpadded convolution, so
book-keeping keeps the PADDED input and treats the layer as the ``nn.Conv2d`` it then is (:func:`same_padding`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dplit.models.lstm import LSTMScan
from dplit.privacy.coverage import UncoveredParameterError
from dplit.privacy.transformer_rules import bookkeeping_rule, tied_reason

RULES: dict[type[nn.Module], tuple[str, ...]] = {
    nn.Linear: ("weight", "bias"),
    nn.Conv2d: ("weight", "bias"),
    nn.GroupNorm: ("weight", "bias"),
    nn.Embedding: ("weight",),
    LSTMScan: ("weight",),
}
SUPPORTED = tuple(RULES)
_ALTERNATIVE = "Use `grad_sample_mode: hooks` or `functorch` for this model."


def same_padding(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The input padding of timm's ``Conv2dSame`` (exactly that class), as a function of the layer's input; None for
    any other module, and for a ``Conv2dSame`` whose own padding is not zero (its forward would pad twice).

    ``Conv2dSame.forward(x)`` is ``conv2d(pad_same(x, kernel, stride, dilation), weight, bias, stride, 0, dilation,
    groups)``, i.e. the layer's ``nn.Conv2d`` forward (padding 0) on ``pad_same(x)``. ``BookKeeping`` checks at every
    capture that the padded input gives the output's size."""
    cls = type(m)
    if (cls.__module__, cls.__name__) != ("timm.layers.conv2d_same", "Conv2dSame"):
        return None
    assert isinstance(m, nn.Conv2d)
    if tuple(m.padding) != (0, 0) or m.padding_mode != "zeros":  # type: ignore[arg-type]
        return None
    from timm.layers.padding import pad_same

    kernel, stride, dilation = list(m.weight.shape[-2:]), list(m.stride), list(m.dilation)
    return lambda x: pad_same(x, kernel, stride, dilation)


def covered(m: nn.Module) -> bool:
    """Whether ``m`` has a book-keeping rule (it may still hold parameters outside it: see ``check_supported``)."""
    return type(m) in RULES or bookkeeping_rule(m) is not None or same_padding(m) is not None


def _unsupported_reason(m: nn.Module) -> str | None:
    rule = RULES.get(type(m)) or getattr(bookkeeping_rule(m), "params", None)  # transformer_rules: Conv1D, norms
    if rule is None and same_padding(m) is not None:
        rule = RULES[nn.Conv2d]
    if isinstance(m, nn.MultiheadAttention):
        return "no book-keeping rule; replace it by opacus.layers.DPMultiheadAttention, built from Linear layers"
    if rule is None:
        base = next((t.__name__ for t in SUPPORTED if isinstance(m, t)), None)
        return f"subclass of {base}: no book-keeping rule for its forward" if base else "no book-keeping rule"
    extra = [name for name, _ in m.named_parameters(recurse=False) if name not in rule]
    if extra:
        return f"parameters outside the {type(m).__name__} rule: {', '.join(extra)}"
    if isinstance(m, nn.Embedding) and (m.sparse or m.scale_grad_by_freq or m.max_norm is not None):
        return "sparse / scale_grad_by_freq / max_norm"
    return None


def trainable(m: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in m.named_parameters(recurse=False) if p.requires_grad]


def uncovered_parameters(module: nn.Module) -> list[str]:
    """One entry per module whose trainable parameters book-keeping cannot clip, naming those parameters."""
    qualified = {p: name for name, p in module.named_parameters()}  # the first name of a shared parameter
    owners: dict[nn.Parameter, list[str]] = {}
    for mname, m in module.named_modules():
        for _, p in trainable(m):
            owners.setdefault(p, []).append(mname or "<root>")
    bad = []
    for mname, m in module.named_modules():
        params = trainable(m)
        if not params:
            continue
        names = ", ".join(qualified[p] for _, p in params)
        if reason := _unsupported_reason(m):
            bad.append(f"{mname or '<root>'} ({type(m).__name__}: {reason}; trainable {names})")
        shared = [p for _, p in params if len(owners[p]) > 1 and owners[p][0] == (mname or "<root>")]
        bad.extend(
            f"{qualified[p]} (shared by {' and '.join(owners[p])}: {why})"
            for p in shared
            if (why := tied_reason([module.get_submodule(o) for o in owners[p]]))
        )
    return bad


def check_supported(module: nn.Module) -> None:
    """Raise ``ValueError`` naming every trainable parameter that book-keeping clipping cannot clip."""
    bad = uncovered_parameters(module)
    if bad:
        raise UncoveredParameterError(
            "`grad_sample_mode: bookkeeping` clips the parameters of exact Linear, Conv2d (and timm's Conv2dSame), "
            "GroupNorm, Embedding "
            "(dense, no max_norm), dplit LSTM, GPT-2 Conv1D, LlamaRMSNorm and LayerNorm layers only; "
            f"unsupported: {', '.join(bad)}. {_ALTERNATIVE}"
        )


__all__ = ["RULES", "check_supported", "covered", "same_padding", "trainable", "uncovered_parameters"]
