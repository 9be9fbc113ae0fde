"""Book-keeping clipping (Bu et al. 2023, "Differentially private optimization on large model at small cost").

One ordinary backward pass: forward/backward hooks keep each layer's input activations ``a`` and output gradients
``g``; once backward is done, per-example gradient norms are formed per layer (ghost norms for Linear layers,
per-example gradients for Conv2d through unfold), the clip factors ``c_i = min(1, C / ||grad_i||)`` computed from
the whole-model norm, and each layer's clipped sum ``sum_i c_i grad_i`` written into ``p.grad`` directly (a
weighted ``g^T a`` product), without the second backward pass of ghost clipping. The DP optimizer then adds the
noise once (Opacus' ``DPOptimizerFastGradientClipping``, which reads ``p.grad`` as the clipped sum).

Supported trainable layers: ``nn.Linear`` (any number of leading dims), ``nn.Conv2d`` (groups=1), ``nn.Embedding``
(sparse per-example norms: each example touches only the rows of its own tokens, so its squared norm is summed over
its distinct tokens, and the clipped sum is an ``index_add`` of the scaled output gradients; nothing of size
vocabulary x dim is formed per example) and :class:`dplit.models.lstm.LSTMScan` (recurrent weights, from the gate
gradients its backward keeps: ghost norms over timesteps per direction, one batched product for the clipped sum).
For sequence inputs, per-example norms use the ghost-norm identity when ``T^2`` is below the weight size and the
materialised per-example gradient otherwise (Bu et al.'s layer-wise choice). Others are refused in
``check_supported`` with the layer's name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.functional import unfold

from dplit.models.lstm import LSTMScan

SUPPORTED = (nn.Linear, nn.Conv2d, nn.Embedding, LSTMScan)


def _unsupported_reason(m: nn.Module) -> str | None:
    if not isinstance(m, SUPPORTED):
        return "no book-keeping rule"
    if isinstance(m, nn.Conv2d) and (m.groups != 1 or isinstance(m.padding, str)):
        return "groups != 1 or string padding"
    if isinstance(m, nn.Embedding) and (m.sparse or m.scale_grad_by_freq or m.max_norm is not None):
        return "sparse / scale_grad_by_freq / max_norm"
    return None


def check_supported(module: nn.Module) -> None:
    """Raise ``ValueError`` naming every trainable layer that book-keeping clipping cannot handle."""
    bad = [
        f"{name or '<root>'} ({type(m).__name__}: {reason})"
        for name, m in module.named_modules()
        if any(p.requires_grad for p in m.parameters(recurse=False)) and (reason := _unsupported_reason(m))
    ]
    if bad:
        raise ValueError(
            "`grad_sample_mode: bookkeeping` supports trainable Linear, Conv2d (groups=1, numeric padding), "
            "Embedding (dense, no max_norm) and dplit LSTM layers only; "
            f"unsupported: {', '.join(bad)}. Use `grad_sample_mode: ghost` or `hooks` for this model."
        )


class BookKeeping:
    """Hooks on every trainable Linear/Conv2d of ``module``; ``clip_into_grad()`` after each backward.

    Args:
        module: the model (hooks are attached in place; ``remove_hooks()`` detaches them).
        max_grad_norm: the clipping bound C on each example's whole-model gradient norm.
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        check_supported(module)
        self.max_grad_norm = max_grad_norm
        self.layers = [m for m in module.modules() if isinstance(m, SUPPORTED) and m.weight.requires_grad]
        self._store: dict[nn.Module, dict[str, torch.Tensor]] = {}
        self._handles = []
        for m in self.layers:
            if isinstance(m, LSTMScan):  # its backward keeps what is needed (no hooks: see _capture)
                m.keep_for_dp = m.weight_grad_by_dp = True
                continue
            self._handles.append(m.register_forward_hook(self._forward_hook))
            self._handles.append(m.register_full_backward_hook(self._backward_hook))
        self.last_norms: torch.Tensor | None = None
        self.batches_clipped = 0

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self._store[module] = {"a": inputs[0].detach()}

    def _backward_hook(self, module: nn.Module, grad_input: Any, grad_output: tuple[torch.Tensor, ...]) -> None:
        if module in self._store:
            self._store[module]["g"] = grad_output[0].detach()

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for m in self.layers:
            if isinstance(m, LSTMScan):
                m.weight_grad_by_dp = False

    def _capture(self, m: nn.Module) -> dict[str, torch.Tensor] | None:
        if isinstance(m, LSTMScan):
            if m.saved_dz is None or m.saved_h_prev is None:
                return None
            entry = {"a": m.saved_h_prev, "g": m.saved_dz}  # [D, B, T, H], [D, B, T, 4H]
            m.clear_saved()
            return entry
        return self._store.get(m)

    @torch.no_grad()
    def clip_into_grad(self) -> None:
        """Replace each layer's ``p.grad`` (the unclipped mean) by the sum of clipped per-example gradients."""
        entries = [(m, self._capture(m)) for m in self.layers]
        if any(e is None or "g" not in e for _, e in entries):
            missing = [type(m).__name__ for m, e in entries if e is None or "g" not in e]
            raise RuntimeError(f"book-keeping clipping: no activations/gradients captured for {missing}")
        n = _batch_size(*entries[0])
        if n == 0:  # an empty Poisson batch: the clipped sum is zero (the optimizer still adds the noise)
            for m in self.layers:
                for p in m.parameters(recurse=False):
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            self.last_norms = torch.zeros(0, device=self.layers[0].weight.device)
            self._store.clear()
            self.batches_clipped += 1
            return
        per_layer: list[tuple[Any, dict[str, torch.Tensor], torch.Tensor | None]] = []
        sq_norms = torch.zeros(n, dtype=torch.float64, device=self.layers[0].weight.device)
        for m, e in entries:
            assert e is not None
            # the loss is a mean over the n examples: each example's own gradient is n * (its share); every rule
            # is linear in g, so the factor goes on the squared norms (n^2) and the clip factors (n), not on g
            grads = self._per_example(m, e)  # conv: [n, out, in*k*k]; linear: None (ghost norm)
            sq = self._sq_norm(m, e, grads) * (n * n)
            sq_norms += sq.double()
            per_layer.append((m, e, grads))
        norms = sq_norms.sqrt()
        self.last_norms = norms.float()
        coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0).to(self.layers[0].weight.dtype)  # [n]
        coef = coef * n  # applied to the captured (mean-loss) gradients: see above
        for m, e, grads in per_layer:
            self._write_clipped(m, e, grads, coef)
        self._store.clear()
        self.batches_clipped += 1

    @staticmethod
    def _per_example(m: nn.Module, e: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if isinstance(m, (nn.Linear, nn.Embedding, LSTMScan)):
            return None
        assert isinstance(m, nn.Conv2d)
        assert not isinstance(m.padding, str)
        cols = unfold(e["a"], m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # [n, i*k*k, L]
        g = e["g"].flatten(2)  # [n, out, L]
        return torch.bmm(g, cols.transpose(1, 2))  # [n, out, in*k*k]: each example's weight gradient

    @staticmethod
    def _sq_norm(m: nn.Module, e: dict[str, torch.Tensor], grads: torch.Tensor | None) -> torch.Tensor:
        if isinstance(m, nn.Embedding):
            return _embedding_sq_norm(m, e["a"], e["g"])
        if isinstance(m, LSTMScan):
            a4, g4 = e["a"], e["g"]  # [D, B, T, H], [D, B, T, 4H]
            d, nb, t_len = a4.shape[:3]
            a3, g3 = a4.reshape(d * nb, t_len, -1), g4.reshape(d * nb, t_len, -1)  # views
            return _seq_sq_norm(a3, g3).view(d, nb).sum(0)
        a, g = e["a"], e["g"]
        n = len(a)
        if grads is not None:  # conv
            sq = grads.flatten(1).pow(2).sum(1)
            if m.bias is not None and m.bias.requires_grad:
                sq = sq + g.flatten(2).sum(2).pow(2).sum(1)
            return sq
        a3, g3 = a.reshape(n, -1, a.shape[-1]), g.reshape(n, -1, g.shape[-1])  # [n, T, in], [n, T, out]
        sq = _seq_sq_norm(a3, g3)
        if m.bias is not None and m.bias.requires_grad:
            sq = sq + g3.sum(1).pow(2).sum(1)
        return sq

    @staticmethod
    def _write_clipped(
        m: nn.Module, e: dict[str, torch.Tensor], grads: torch.Tensor | None, coef: torch.Tensor
    ) -> None:
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
        assert isinstance(m.weight, torch.Tensor)
        if grads is not None:  # conv: weighted sum of the per-example gradients
            w = torch.einsum("n,noi->oi", coef, grads).reshape_as(m.weight)
            b = torch.einsum("n,no->o", coef, g.flatten(2).sum(2)) if m.bias is not None else None
        else:
            gc = (g.reshape(n, -1, g.shape[-1]) * coef[:, None, None]).flatten(0, 1)  # [n*T, out]
            w = gc.T @ a.reshape(-1, a.shape[-1])  # [out, in]
            b = gc.sum(0) if m.bias is not None else None
        weight, bias = m.weight, m.bias
        assert isinstance(weight, torch.Tensor)
        weight.grad = w.to(weight.dtype)
        if b is not None and isinstance(bias, torch.Tensor) and bias.requires_grad:
            bias.grad = b.to(bias.dtype)


def _batch_size(m: nn.Module, e: dict[str, torch.Tensor] | None) -> int:
    assert e is not None
    return e["a"].shape[1] if isinstance(m, LSTMScan) else len(e["a"])


def _seq_sq_norm(a3: torch.Tensor, g3: torch.Tensor) -> torch.Tensor:
    """Squared norms ``[n]`` of ``sum_t g_t a_t^T`` for ``a3`` [n, T, in], ``g3`` [n, T, out]."""
    t_len = a3.shape[1]
    if t_len == 1:  # ||g a^T||^2 = ||g||^2 ||a||^2
        return g3[:, 0].pow(2).sum(1) * a3[:, 0].pow(2).sum(1)
    if t_len * t_len <= a3.shape[2] * g3.shape[2]:  # ghost norm: sum_{t,s} (a_t . a_s)(g_t . g_s)
        return (torch.bmm(a3, a3.transpose(1, 2)) * torch.bmm(g3, g3.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g3.transpose(1, 2), a3).flatten(1).pow(2).sum(1)  # the per-example gradients themselves


def _embedding_sq_norm(m: nn.Embedding, ids: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
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


__all__ = ["BookKeeping", "check_supported"]
