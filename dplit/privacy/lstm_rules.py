"""Per-example gradients of dplit's LSTM (:class:`~dplit.models.lstm.LSTMScan`) for every clipping backend.

The model stays a plain module: :class:`GateCapture` observes its hand-written backward through
``LSTMScan.register_gate_grad_hook`` and keeps, per layer, the previous hidden states ``h_prev`` ``[D, B, T, H]`` and
gate gradients ``dz`` ``[D, B, T, 4H]`` of the last backward. Each example's recurrent-weight gradient is then
``sum_t dz_t h_{t-1}^T``: one einsum over all timesteps, instead of one hook per timestep (Opacus' ``DPLSTM``).

* Opacus (hooks, ghost): the grad sampler registered here for ``LSTMScan`` reads the capture.
* Book-keeping: :class:`~dplit.privacy.bookkeeping.BookKeeping` takes the capture and writes ``weight.grad`` itself,
  so the capture asks the backward to skip the summed weight gradient (``own_weight_grad=True``).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from dplit.models.lstm import LSTMScan

_CAPTURED: weakref.WeakKeyDictionary[LSTMScan, tuple[Tensor, Tensor, Tensor]] = weakref.WeakKeyDictionary()


class GateCapture:
    """Keeps each ``LSTMScan``'s last ``(h_prev, dz, grad_out)``; ``remove()`` detaches the hooks.

    Args:
        module: the model (every ``LSTMScan`` in it is observed).
        own_weight_grad: the owner writes ``weight.grad`` itself (book-keeping): skip the summed weight gradient.
    """

    def __init__(self, module: nn.Module, own_weight_grad: bool = False) -> None:
        self.own_weight_grad = own_weight_grad
        self.layers = [m for m in module.modules() if isinstance(m, LSTMScan)]
        self._handles = [m.register_gate_grad_hook(self._hook) for m in self.layers]

    def _hook(self, module: LSTMScan, h_prev: Tensor, dz: Tensor, grad_out: Tensor) -> bool:
        _CAPTURED[module] = (h_prev, dz, grad_out)
        return self.own_weight_grad

    @staticmethod
    def take(module: LSTMScan) -> tuple[Tensor, Tensor, Tensor] | None:
        """The last backward's ``(h_prev, dz, grad_out)`` of ``module`` (removed from the capture), or None."""
        return _CAPTURED.pop(module, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for m in self.layers:
            _CAPTURED.pop(m, None)


def per_example_weight_grad(h_prev: Tensor, dz: Tensor) -> Tensor:
    """Per-example gradients ``[B, D, 4H, H]`` of ``LSTMScan.weight``: ``sum_t dz_t h_{t-1}^T`` per direction."""
    return torch.einsum("dbtg,dbth->bdgh", dz, h_prev)


@register_grad_sampler(LSTMScan)
def compute_lstm_scan_grad_sample(layer: LSTMScan, activations: list[Tensor], backprops: Tensor) -> dict[Any, Tensor]:
    """Opacus rule: per-example gradients ``[B, D, 4H, H]`` of ``layer.weight`` from the captured gate gradients.

    Opacus passes ``backprops`` = the output gradient times its loss-reduction factor (the batch size for a mean
    loss); the captured gradients are unscaled, so the same factor is read off the ratio of the two.
    """
    captured = GateCapture.take(layer)
    if captured is None:
        raise RuntimeError("LSTMScan: no captured backward; the clipping backend must attach a GateCapture")
    h_prev, dz, saved_out = captured
    denom = saved_out.pow(2).sum()
    scale = 1.0 if denom == 0 else float(torch.round((backprops * saved_out).sum() / denom))
    grad = per_example_weight_grad(h_prev, dz) * scale
    return {layer.weight: grad} if layer.weight.requires_grad else {}


__all__ = ["GateCapture", "compute_lstm_scan_grad_sample", "per_example_weight_grad"]
