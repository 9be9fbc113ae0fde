"""Which trainable parameters each per-sample-gradient backend clips correctly (invariant 6), checked at setup.

What Opacus 1.6 gets wrong was measured, not assumed (``tests/test_sensitivity_zoo.py`` runs every backend on a
zoo of models against per-example autograd):

* ``hooks`` and ``ghost``: Opacus' Conv1d/2d/3d rule unfolds the input with zero padding, so a convolution with
  ``padding_mode`` reflect / replicate / circular gets wrong per-example weight gradients (hooks: the update is
  off by ~20%; ghost: the norms are wrong while the second backward is exact, so one example moves the model by up
  to 1.04 C). ``functorch`` differentiates the layer's own forward and is exact.
* ``ghost``: a parameter shared by several modules (tied embeddings) or a Linear/Embedding run twice in a forward
  gets per-use norms, not the norm of the summed per-example gradient; Opacus raises a bare "Parameter tying is not
  supported" mid-step in some of these cases and silently mis-clips in others (a parameter shared between a layer
  with a norm rule and one without). Tied parameters are refused here by name; repeated use can only be seen when
  it happens: attach :class:`RepeatedUseGuard`.
* ``hooks`` and ``ghost``: Opacus' Embedding rules ignore ``scale_grad_by_freq`` (update off by ~2%), and
  ``padding_idx`` (off by ~9% when padded positions get a gradient; dplit's own text embeddings mask them, so it is
  not refused here). ``max_norm`` is refused in every mode: the forward renormalises rows in place, outside DP.
* all three Opacus modes: ``nn.MultiheadAttention`` (Opacus' validator refuses it without naming it; its
  ``opacus.layers.DPMultiheadAttention`` replacement is built from Linear layers).
* ``functorch``: dplit's LSTM (:class:`~dplit.models.lstm.LSTMScan`) has a hand-written backward it cannot trace.
* ``bookkeeping``: see :func:`dplit.privacy.bookkeeping.check_supported` (exact Linear/Conv2d/Embedding/LSTMScan
  rules, GPT-2 Conv1D / LlamaRMSNorm / LayerNorm and an Embedding tied to a Linear head by
  :mod:`dplit.privacy.transformer_rules`; repeated use is refused by the backend itself).

``hooks`` and ``functorch`` sum per-use gradients of tied and repeatedly used parameters exactly, and fall back to
``torch.func`` for any module without a rule (LoRA subclasses, bare parameters, RMSNorm), which is exact too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MODES = ("hooks", "functorch", "ghost", "bookkeeping")


class UncoveredParameterError(ValueError):
    """A trainable parameter would not be clipped correctly by the configured per-sample-gradient backend."""


def _qualified(module: nn.Module) -> dict[nn.Parameter, str]:
    return {p: name for name, p in module.named_parameters()}  # a shared parameter keeps its first name


def _trainable(m: nn.Module) -> list[nn.Parameter]:
    return [p for p in m.parameters(recurse=False) if p.requires_grad]


def shared_parameters(module: nn.Module) -> dict[nn.Parameter, list[str]]:
    """Trainable parameters registered on more than one module (tied weights) -> the names of those modules."""
    owners: dict[nn.Parameter, list[str]] = {}
    for name, m in module.named_modules():
        for p in _trainable(m):
            owners.setdefault(p, []).append(name or "<root>")
    return {p: names for p, names in owners.items() if len(names) > 1}


def uncovered(module: nn.Module, grad_sample_mode: str) -> list[str]:
    """One line per trainable parameter (or layer) that ``grad_sample_mode`` would not clip correctly."""
    if grad_sample_mode == "bookkeeping":
        from dplit.privacy.bookkeeping import uncovered_parameters  # imports this module

        return uncovered_parameters(module)
    if grad_sample_mode not in _MODES:
        raise ValueError(f"unknown grad_sample_mode {grad_sample_mode!r}; expected one of {', '.join(_MODES)}")
    from dplit.models.lstm import LSTMScan

    names = _qualified(module)
    bad: list[str] = []
    for mname, m in module.named_modules():
        params = _trainable(m)
        if not params:
            continue
        listed = ", ".join(names[p] for p in params)
        if isinstance(m, nn.MultiheadAttention):
            bad.append(
                f"{listed} (nn.MultiheadAttention {mname}: no per-sample rule, and its forward takes three inputs "
                "where the functorch fallback passes one; replace it by opacus.layers.DPMultiheadAttention)"
            )
        elif grad_sample_mode in ("hooks", "ghost") and type(m) in _CONV and m.padding_mode != "zeros":
            bad.append(
                f"{listed} ({type(m).__name__} with padding_mode={m.padding_mode!r}: Opacus' rule pads with zeros; "
                f"use `grad_sample_mode: {'functorch' if grad_sample_mode == 'hooks' else 'hooks` or `functorch'}`)"
            )
        elif isinstance(m, nn.Embedding) and m.max_norm is not None:
            bad.append(
                f"{listed} (Embedding {mname} with max_norm: its forward renormalises the looked-up rows in place, "
                "a data-dependent update outside DP; remove max_norm)"
            )
        elif grad_sample_mode in ("hooks", "ghost") and type(m) is nn.Embedding and m.scale_grad_by_freq:
            bad.append(
                f"{listed} (Embedding {mname} with scale_grad_by_freq: Opacus' rule ignores it, and autograd scales "
                "by frequencies over the whole batch; use `grad_sample_mode: functorch` or drop scale_grad_by_freq)"
            )
        elif grad_sample_mode == "functorch" and isinstance(m, LSTMScan):
            bad.append(
                f"{listed} (dplit LSTM layer {mname}: a hand-written backward that functorch cannot trace; use "
                "`grad_sample_mode: bookkeeping` (fastest) or `hooks`)"
            )
    if grad_sample_mode == "ghost":
        bad.extend(
            f"{names[p]} (shared by {' and '.join(owners)}: Opacus' ghost clipping takes per-layer norms, not the "
            "norm of the summed per-example gradient, whose cross term needs both uses' activations at once; use "
            "`grad_sample_mode: bookkeeping` (exact for an Embedding tied to a Linear head), `hooks` or `functorch`)"
            for p, owners in shared_parameters(module).items()
        )
    return bad


def check_coverage(module: nn.Module, grad_sample_mode: str) -> None:
    """Raise :class:`UncoveredParameterError` (a ``ValueError``) naming every trainable parameter that
    ``grad_sample_mode`` would not clip correctly, with the backend to use instead.

    Static checks only; a layer run several times in one forward is seen at run time (``RepeatedUseGuard``; the
    book-keeping backend checks it itself).
    """
    if grad_sample_mode == "bookkeeping":
        from dplit.privacy.bookkeeping import check_supported  # imports this module

        check_supported(module)
        return
    bad = uncovered(module, grad_sample_mode)
    if bad:
        raise UncoveredParameterError(
            f"`grad_sample_mode: {grad_sample_mode}` would not clip these trainable parameters correctly: "
            f"{'; '.join(bad)}."
        )


class RepeatedUseGuard:
    """Refuses a layer that runs more than once in one training step, where the backend cannot sum its uses.

    Ghost clipping's norm rules (Opacus' exact Linear and Embedding) see one use of a layer; a second use of the
    same layer in a forward would be mis-clipped (Opacus raises an unnamed ``NotImplementedError``). This guard
    counts training-mode forwards per layer with a forward hook that runs before Opacus' own, and raises
    :class:`UncoveredParameterError` naming the layer's parameters on the second call. Call ``reset()`` at the
    start of each physical batch (``on_train_batch_start``) and ``remove()`` when detaching.

    Args:
        module: the model.
        grad_sample_mode: the backend; only ``ghost`` needs guarding (hooks and functorch sum the uses exactly,
            book-keeping counts them itself), so for the others the guard attaches nothing.
    """

    def __init__(self, module: nn.Module, grad_sample_mode: str) -> None:
        self.counts: dict[nn.Module, int] = {}
        self.names = {m: name or "<root>" for name, m in module.named_modules()}
        self._handles: list[Any] = []
        if grad_sample_mode != "ghost":
            return
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        guarded = tuple(GradSampleModuleFastGradientClipping.NORM_SAMPLERS)
        for m in module.modules():
            if type(m) in guarded and _trainable(m):
                self._handles.append(m.register_forward_hook(self._count, prepend=True))

    def _count(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self.counts[module] = self.counts.get(module, 0) + 1
        if self.counts[module] > 1:
            name = self.names[module]
            params = ", ".join(f"{name}.{p}" for p, q in module.named_parameters(recurse=False) if q.requires_grad)
            raise UncoveredParameterError(
                f"`grad_sample_mode: ghost`: layer {name} ({type(module).__name__}) ran twice in one training step; "
                f"ghost clipping would take per-use norms of {params} instead of the norm of their summed "
                "per-example gradient. Use `grad_sample_mode: hooks` or `functorch`."
            )

    def reset(self) -> None:
        """Start counting a new step."""
        self.counts.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


__all__ = ["RepeatedUseGuard", "UncoveredParameterError", "check_coverage", "shared_parameters", "uncovered"]
