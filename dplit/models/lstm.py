"""A (bi)directional multi-layer LSTM whose per-example gradients cost one einsum per weight, not one hook per step.

Opacus' ``DPLSTM`` unrolls the recurrence into Python-level cells, so per-sample gradients are captured by a hook
at every timestep of every layer (512 hook calls for a 2-layer BiLSTM over 64 tokens). Here each layer is

* ``ih``: an ``nn.Linear(in, D*4H)`` applied once to the whole sequence (the input projections of all timesteps
  and both directions, with the bias); per-example gradients are those of any sequence Linear layer;
* ``hh``: an :class:`LSTMScan` holding the recurrent weights ``[D, 4H, H]``. Its forward runs the recurrence over
  the projected inputs (no autograd graph per step) and its backward is hand-written backpropagation through
  time, which yields the gate pre-activation gradients ``dz`` of every timestep at once. ``dz`` is the gradient
  flowing into ``ih`` (so that layer needs nothing special) and, with the previous hidden states ``h_{t-1}``, gives
  each example's recurrent-weight gradient ``sum_t dz_t h_{t-1}^T``: one einsum over all timesteps.

Padding: ``mask[b, t]`` (True for real tokens) freezes the state at padded positions, so padded timesteps carry
no gradient and a right-padded sequence gives the same final states as the unpadded one (for both directions).
Gate order within ``4H`` is ``i, f, o, g``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class _ScanFn(torch.autograd.Function):
    """``h = scan(xproj, weight)`` for D directions; saves what the hand-written backward needs.

    Layouts: the loop works on time-major ``[T, D, B, .]`` tensors (each direction in its own time order), while the
    previous hidden states and gate gradients kept for per-example gradients are ``[D, B, T, .]``, so their
    per-direction, per-example and summed products are views and batched matrix products, without copies.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, xproj: Tensor, weight: Tensor, mask: Tensor, module: LSTMScan | None
    ) -> Tensor:
        b, t_len, _ = xproj.shape
        d, four_h, h_dim = weight.shape
        xs = _to_time_major(xproj.view(b, t_len, d, four_h))  # [T, D, B, 4H]
        m = _to_time_major(mask[:, :, None].expand(b, t_len, d)[..., None])  # [T, D, B, 1] bool
        wt = weight.transpose(1, 2)  # [D, H, 4H]
        h = xproj.new_zeros(d, b, h_dim)
        c = xproj.new_zeros(d, b, h_dim)
        acts = xproj.new_empty(t_len, d, b, four_h)
        c_new_all = xproj.new_empty(t_len, d, b, h_dim)
        c_prev = xproj.new_empty(t_len, d, b, h_dim)
        h_prev = xproj.new_empty(d, b, t_len, h_dim)  # [D, B, T, H]
        three_h = 3 * h_dim
        for t in range(t_len):
            h_prev[:, :, t] = h
            c_prev[t] = c
            z = torch.baddbmm(xs[t], h, wt)  # [D, B, 4H]
            a = acts[t]
            torch.sigmoid(z[..., :three_h], out=a[..., :three_h])
            torch.tanh(z[..., three_h:], out=a[..., three_h:])
            i, f, o, g = a[..., :h_dim], a[..., h_dim : 2 * h_dim], a[..., 2 * h_dim : three_h], a[..., three_h:]
            cn = torch.addcmul(f * c, i, g)
            c_new_all[t] = cn
            hn = o * torch.tanh(cn)
            c = torch.where(m[t], cn, c)
            h = torch.where(m[t], hn, h)
        out = torch.cat([h_prev[:, :, 1:], h[:, :, None]], 2)  # h_t for t = 0..T-1, [D, B, T, H]
        ctx.save_for_backward(weight, mask, acts, c_new_all, h_prev, c_prev)
        ctx.module = module
        return _dbt_to_batch_first(out)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        weight, mask, acts, c_new_all, h_prev, c_prev = ctx.saved_tensors
        t_len, d, b, four_h = acts.shape
        h_dim = four_h // 4
        three_h = 3 * h_dim
        gy = _to_time_major(grad_out.reshape(b, t_len, d, h_dim))  # [T, D, B, H]
        m = _to_time_major(mask[:, :, None].expand(b, t_len, d)[..., None]).to(grad_out.dtype)
        dz_all = grad_out.new_empty(d, b, t_len, four_h)  # [D, B, T, 4H]
        dh = grad_out.new_zeros(d, b, h_dim)
        dc = grad_out.new_zeros(d, b, h_dim)
        for t in range(t_len - 1, -1, -1):
            dh = dh + gy[t]
            mt = m[t]
            keep = 1.0 - mt
            dht, dct = dh * mt, dc * mt
            a = acts[t]
            i, f, o, g = a[..., :h_dim], a[..., h_dim : 2 * h_dim], a[..., 2 * h_dim : three_h], a[..., three_h:]
            tc = torch.tanh(c_new_all[t])
            dct = dct + dht * o * (1.0 - tc * tc)
            dz = torch.cat(
                [dct * g * i * (1.0 - i), dct * c_prev[t] * f * (1.0 - f), dht * tc * o * (1.0 - o),
                 dct * i * (1.0 - g * g)], -1,
            )  # fmt: skip
            dz_all[:, :, t] = dz
            dc = dct * f + dc * keep
            dh = torch.bmm(dz, weight) + dh * keep  # [D, B, H]
        grad_x = _dbt_to_batch_first(dz_all) if ctx.needs_input_grad[0] else None
        module: LSTMScan | None = ctx.module
        skip_weight_grad = False
        if module is not None:  # gate-gradient hooks: each may take over the weight gradient (returns True)
            for hook in list(module._gate_grad_hooks.values()):
                skip_weight_grad |= bool(hook(module, h_prev, dz_all, grad_out))
        grad_w = None
        if ctx.needs_input_grad[1] and not skip_weight_grad:
            # sum over timesteps and examples of dz_t h_{t-1}^T, per direction
            grad_w = torch.bmm(dz_all.view(d, b * t_len, four_h).transpose(1, 2), h_prev.view(d, b * t_len, h_dim))
        return grad_x, grad_w, None, None


def _to_time_major(x: Tensor) -> Tensor:
    """``[B, T, D, ...]`` -> ``[T, D, B, ...]`` with direction 1 (if any) reversed in time."""
    x = x.transpose(0, 1).transpose(1, 2)  # [T, D, B, ...]
    if x.shape[1] == 1:
        return x.contiguous()
    return torch.stack([x[:, 0], x[:, 1].flip(0)], 1)


def _dbt_to_batch_first(x: Tensor) -> Tensor:
    """``[D, B, T, F]`` (direction 1 reversed in time) -> ``[B, T, D*F]`` in the input's time order."""
    d, b, t_len, f = x.shape
    if d == 2:
        x = torch.stack([x[0], x[1].flip(1)], 0)
    return x.permute(1, 2, 0, 3).reshape(b, t_len, d * f)


class LSTMScan(nn.Module):
    """The recurrent part of one LSTM layer (``D`` directions): ``h = scan(xproj)``, with weight ``[D, 4H, H]``.

    A plain module. Like ``nn.Module``'s own hooks, :meth:`register_gate_grad_hook` lets other code observe what the
    hand-written backward computes: the previous hidden states ``h_prev`` ``[D, B, T, H]`` and gate gradients
    ``dz`` ``[D, B, T, 4H]`` of every timestep (each direction in its own time order), from which per-example
    weight gradients are one product (``dplit.privacy.lstm_rules`` uses it).
    """

    def __init__(self, hidden_size: int, num_directions: int = 1) -> None:
        super().__init__()
        if num_directions not in (1, 2):
            raise ValueError(f"num_directions must be 1 or 2, got {num_directions}")
        self.hidden_size = hidden_size
        self.num_directions = num_directions
        self.weight = nn.Parameter(torch.empty(num_directions, 4 * hidden_size, hidden_size))
        self._gate_grad_hooks: OrderedDict[int, Callable[..., bool | None]] = OrderedDict()

    def register_gate_grad_hook(self, hook: Callable[..., bool | None]) -> RemovableHandle:
        """``hook(module, h_prev, dz, grad_out)`` runs in each backward of a training forward; if it returns True,
        the summed weight gradient is not computed (the hook's owner writes ``weight.grad`` itself)."""
        handle = RemovableHandle(self._gate_grad_hooks)
        self._gate_grad_hooks[handle.id] = hook
        return handle

    def forward(self, xproj: Tensor, mask: Tensor) -> Tensor:
        """``xproj`` ``[B, T, D*4H]`` (input projections incl. bias), ``mask`` ``[B, T]`` bool -> ``[B, T, D*H]``."""
        observed = bool(self._gate_grad_hooks) and self.training and torch.is_grad_enabled()
        return _ScanFn.apply(xproj, self.weight, mask, self if observed else None)  # type: ignore[no-any-return]


class LSTM(nn.Module):
    """Batch-first multi-layer (bi)directional LSTM built from :class:`LSTMScan` layers (see the module docstring).

    Args:
        input_size: features per timestep.
        hidden_size: H, per direction.
        num_layers: stacked layers; layer ``l > 0`` reads the ``D*H`` outputs of layer ``l - 1``.
        bidirectional: D = 2 when True.
        dropout: dropout between layers (not after the last), as in ``nn.LSTM``.

    ``forward(x [B, T, in], mask [B, T] bool)`` returns ``(outputs [B, T, D*H], final [B, D*H])`` where ``final``
    holds the last layer's final state of each direction (forward: after the last real token; backward: at t=0).
    Initialisation is ``nn.LSTM``'s: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
    """

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bidirectional: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"LSTM sizes must be >= 1 (input_size {input_size}, hidden_size {hidden_size}, num_layers {num_layers})"
            )
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_directions = 2 if bidirectional else 1
        d = self.num_directions
        self.ih = nn.ModuleList(
            nn.Linear(input_size if layer == 0 else d * hidden_size, d * 4 * hidden_size) for layer in range(num_layers)
        )
        self.hh = nn.ModuleList(LSTMScan(hidden_size, d) for _ in range(num_layers))
        self.dropout = nn.Dropout(dropout) if dropout > 0 and num_layers > 1 else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.hidden_size**-0.5
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, t_len, _ = x.shape
        if mask is None:
            mask = torch.ones(b, t_len, dtype=torch.bool, device=x.device)
        out = x
        for layer, (ih, hh) in enumerate(zip(self.ih, self.hh)):
            if layer > 0 and self.dropout is not None:
                out = self.dropout(out)
            out = hh(ih(out), mask)
        h = self.hidden_size
        if t_len == 0:
            return out, out.new_zeros(b, self.num_directions * h)
        final = out[:, -1, :h]  # forward direction: state frozen after the last real token
        if self.num_directions == 2:
            final = torch.cat([final, out[:, 0, h:]], 1)
        return out, final

    @classmethod
    def from_torch(cls, lstm: nn.LSTM) -> LSTM:
        """Copy the weights of a batch-first ``nn.LSTM`` (gate order i, f, g, o; two biases) into this layout."""
        if not lstm.batch_first or lstm.proj_size:
            raise ValueError("from_torch needs a batch_first nn.LSTM without projections")
        new = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bidirectional)
        h = lstm.hidden_size
        order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
        with torch.no_grad():
            for layer in range(lstm.num_layers):
                w_ih, w_hh, bias = [], [], []
                for suffix in [""] + (["_reverse"] if lstm.bidirectional else []):
                    get: dict[str, Tensor] = {
                        name: getattr(lstm, f"{name}_l{layer}{suffix}")
                        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
                    }
                    w_ih.append(get["weight_ih"][order])
                    w_hh.append(get["weight_hh"][order])
                    bias.append((get["bias_ih"] + get["bias_hh"])[order])
                ih, hh = new.ih[layer], new.hh[layer]
                assert isinstance(ih, nn.Linear) and isinstance(hh, LSTMScan)
                ih.weight.copy_(torch.cat(w_ih))
                ih.bias.copy_(torch.cat(bias))
                hh.weight.copy_(torch.stack(w_hh))
        return new


__all__ = ["LSTM", "LSTMScan"]
