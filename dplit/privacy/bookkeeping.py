"""Book-keeping clipping (Bu et al. 2023, "Differentially private optimization on large model at small cost").

One ordinary backward pass: forward/backward hooks keep each layer's input activations ``a`` and output gradients
``g``; once backward is done, per-example gradient norms are formed per layer (ghost norms for Linear layers,
per-example gradients for Conv2d by :mod:`dplit.privacy.conv_grads`), the clip factors ``c_i = min(1, C / ||grad_i||)``
computed from the whole-model norm, and each layer's clipped sum ``sum_i c_i grad_i`` written into ``p.grad``
directly (a weighted ``g^T a`` product), without the second backward pass of ghost clipping. The DP optimizer then
adds the noise once (Opacus' ``DPOptimizerFastGradientClipping``, which reads ``p.grad`` as the clipped sum).

Coverage is per trainable parameter (invariant 6): a rule covers the direct parameters of a layer of one EXACT type,
each trainable one clipped whatever the others' ``requires_grad`` (a bias under a frozen weight; BitFit).
``nn.Linear`` (weight, bias; any leading dims), ``nn.Conv2d`` (weight, bias; any stride, dilation, groups, padding
and ``padding_mode``: the input is padded as the layer's forward pads it), ``nn.Embedding`` (sparse
per-example norms over each example's distinct tokens; the clipped sum is an ``index_add``), and
:class:`dplit.models.lstm.LSTMScan` (from the gate gradients its backward keeps: ghost norms over timesteps per
direction, one batched product for the clipped sum); GPT-2 ``Conv1D``, ``LlamaRMSNorm`` and ``nn.LayerNorm`` by
:mod:`dplit.privacy.transformer_rules`, as are an Embedding tied to a Linear output head (the cross term of the
two uses' per-example gradients enters the norm) and privacy units of K rows (clipped on the mean of their rows).
``check_supported`` refuses, by parameter name, a trainable parameter of any other module (a bare
``nn.Parameter``), of a subclass of a rule's type or of a layer with parameters outside its rule (adapters), and a
parameter shared otherwise. A layer run twice in one step is refused when it happens (its per-example gradient is
the sum over its uses).
For sequence inputs, norms use the ghost-norm identity when ``T^2`` is below the weight size and the materialised
per-example gradient otherwise (Bu et al.'s layer-wise choice).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dplit.models.lstm import LSTMScan
from dplit.privacy.bookkeeping_coverage import RULES, check_supported, covered, same_padding, uncovered_parameters
from dplit.privacy.bookkeeping_coverage import trainable as _trainable
from dplit.privacy.bookkeeping_rules import per_example, sq_norm, write_clipped
from dplit.privacy.conv_grads import ConvPerExample, clip_deferred, recompute_weight
from dplit.privacy.coverage import UncoveredParameterError
from dplit.privacy.lstm_rules import GateCapture
from dplit.privacy.precision import widen
from dplit.privacy.transformer_rules import tied_cross_sq, to_units


class BookKeeping:
    """Hooks on every layer of ``module`` with a trainable parameter; ``clip_into_grad()`` after each backward.

    Args:
        module: the model (hooks are attached in place; ``remove_hooks()`` detaches them).
        max_grad_norm: the clipping bound C on each example's whole-model gradient norm.

    Raises:
        UncoveredParameterError: (a ``ValueError``) a trainable parameter has no rule (see ``check_supported``).
    """

    def __init__(self, module: nn.Module, max_grad_norm: float) -> None:
        check_supported(module)
        self.max_grad_norm = max_grad_norm
        self.clip_factors: Callable[[torch.Tensor], torch.Tensor] | None = None
        """Per-example factors from pre-clipping norms (a DP algorithm's); None: min(1, C / norm)."""
        self.chunk_factors: Callable[[torch.Tensor, slice, int], torch.Tensor] | None = None
        """With ``clip_factors``: the same factors for a chunk of units (its norms, its units' slice of the batch,
        the batch's unit count), which lets a large Conv2d's weight be clipped chunk by chunk (``clip_deferred``);
        None: no such shortcut. The factors used are checked against ``clip_factors``' (called once, on the whole
        batch) and the weight recomputed if they differ."""
        self.rows_per_unit: Callable[[int], int] | None = None
        self.names = {m: name or "<root>" for name, m in module.named_modules()}
        self.layers = [m for m in module.modules() if covered(m) and _trainable(m)]
        self._pads = {m: f for m in self.layers if (f := same_padding(m)) is not None}  # timm's Conv2dSame
        self._tied = _tied_pairs(self.layers)  # (embedding, head) sharing a weight: cross term of their norms
        self._store: dict[nn.Module, dict[str, list[torch.Tensor]]] = {}  # per layer: inputs "a", grads "g"
        self._calls: dict[nn.Module, int] = {}  # training forwards per layer since the last clip_into_grad
        self._handles = []
        self._gates = GateCapture(module, own_weight_grad=True)  # LSTM layers: gate gradients, weight.grad by us
        self._hidden: dict[nn.Module, list[torch.Tensor]] = {}  # parameters hidden from autograd in this forward
        self._anchors: dict[torch.device, torch.Tensor] = {}  # put a first layer's output in the graph (_OutputTap)
        for m in self.layers:
            if isinstance(m, nn.Linear | nn.Conv2d):
                self._handles.append(m.register_forward_pre_hook(self._hide_params))
            self._handles.append(m.register_forward_hook(self._forward_hook))
            if not isinstance(m, LSTMScan):
                self._handles.append(m.register_full_backward_hook(self._backward_hook))
        self.last_norms: torch.Tensor | None = None
        self.batches_clipped = 0

    def covered_parameters(self) -> set[nn.Parameter]:
        """The parameters whose ``grad`` ``clip_into_grad`` writes (every trainable parameter of the model)."""
        return {p for m in self.layers for _, p in _trainable(m)}

    def _hide_params(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        """Run the training forward of a Linear (its weight) or Conv2d (weight and bias) with ``requires_grad`` off,
        so that autograd does not form the summed gradients ``clip_into_grad`` replaces anyway (the backward then
        computes only the input gradient, and a Linear's bias gradient; the output gradient ``g`` is still
        captured). On CPU a convolution's bias-only backward costs as much as its weight gradient, hence the bias.
        If the output then needs no gradient (a first layer: its input does not require grad), it is passed through
        ``_OutputTap``, so that the backward still reaches the layer's backward hook. The flags are restored by
        the forward hook, and by ``clip_into_grad``/``remove_hooks`` if a forward failed."""
        if not (module.training and torch.is_grad_enabled()):
            return
        names = ("weight", "bias") if isinstance(module, nn.Conv2d) else ("weight",)
        hidden = [p for k in names if isinstance(p := getattr(module, k, None), torch.Tensor) and p.requires_grad]
        for p in hidden:
            p.requires_grad_(False)
        if hidden:
            self._hidden[module] = hidden

    def _restore_weights(self) -> None:
        for params in self._hidden.values():
            for p in params:
                p.requires_grad_(True)
        self._hidden.clear()

    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
        hidden = self._hidden.pop(module, None)
        for p in hidden or ():
            p.requires_grad_(True)
        tapped = None
        if hidden and isinstance(output, torch.Tensor) and not output.requires_grad:
            anchor = self._anchors.setdefault(output.device, output.new_zeros((), requires_grad=True))
            tapped = _OutputTap.apply(output, anchor)  # nothing before it needs grad: g is still captured
        if module.training and torch.is_grad_enabled():
            self._calls[module] = self._calls.get(module, 0) + 1
            if not isinstance(module, LSTMScan):  # LSTMScan keeps its own (see _capture)
                a = inputs[0].detach()
                if module in self._pads:
                    a = _padded_capture(module, self._pads[module], a, output)
                self._store.setdefault(module, {"a": [], "g": []})["a"].append(a)
        return tapped

    def _backward_hook(self, module: nn.Module, grad_input: Any, grad_output: tuple[torch.Tensor, ...]) -> None:
        if module in self._store:
            self._store[module]["g"].append(grad_output[0].detach())

    def remove_hooks(self) -> None:
        self._restore_weights()
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._gates.remove()

    def _capture(self, m: nn.Module) -> dict[str, torch.Tensor] | None:
        kept = self._store.get(m)
        calls = max(self._calls.get(m, 0), len(kept["g"]) if kept else 0)
        if calls > 1:
            names = ", ".join(f"{self.names[m]}.{name}" for name, _ in _trainable(m))
            raise UncoveredParameterError(
                f"`grad_sample_mode: bookkeeping`: layer {self.names[m]} ({type(m).__name__}) ran {calls} times in "
                f"one training step; the per-example gradient of {names} is the sum over its uses, which "
                "book-keeping does not form. Use `grad_sample_mode: hooks` or `functorch`."
            )
        if isinstance(m, LSTMScan):
            captured = self._gates.take(m)
            if calls == 0 or captured is None:
                return None
            h_prev, dz, _ = captured
            return {"a": widen(h_prev), "g": widen(dz)}  # [D, B, T, H], [D, B, T, 4H]
        if kept is None or not kept["g"]:
            return None
        # bf16-mixed: each example's captures widened to float32; norms and clipped sums are then float32
        return {"a": widen(kept["a"][0]), "g": widen(kept["g"][0])}

    @torch.no_grad()
    def clip_into_grad(self, empty: bool = False) -> None:
        """Replace each covered ``p.grad`` (the unclipped mean) by the sum of clipped per-example gradients.

        ``empty``: the physical batch had no rows (the task may not have run the model): the sum is zero.
        """
        self._restore_weights()
        if empty:  # the clipped sum of no examples; the optimizer still adds the noise
            self._store.clear()
            self._calls.clear()
            for m in self.layers:
                if isinstance(m, LSTMScan):
                    self._gates.take(m)
            for p in self.covered_parameters():
                p.grad = torch.zeros_like(p)
            self.last_norms = None
            self.batches_clipped += 1
            return
        try:
            entries = [(m, self._capture(m)) for m in self.layers]
        finally:
            self._store.clear()
            self._calls.clear()
        missing = [self.names[m] for m, e in entries if e is None]
        if missing:
            raise RuntimeError(f"book-keeping clipping: no activations/gradients captured for {missing}")
        if not entries:  # nothing trainable (refused earlier by compat.check_model)
            self.batches_clipped += 1
            return
        device, dtype = _trainable(self.layers[0])[0][1].device, _trainable(self.layers[0])[0][1].dtype
        n = _batch_size(*entries[0])
        k = self.rows_per_unit(n) if self.rows_per_unit is not None and n else 1
        if k > 1:  # a privacy unit's K rows clipped together: U examples of K*T positions (transformer_rules)
            entries = [(m, _unit_entry(m, e, k)) for m, e in entries]
            n //= k
        if n == 0:  # an empty Poisson batch: the clipped sum is zero (the optimizer still adds the noise)
            for p in self.covered_parameters():
                p.grad = torch.zeros_like(p)
            self.last_norms = torch.zeros(0, device=device)
            self.batches_clipped += 1
            return
        per_layer: list[tuple[Any, dict[str, torch.Tensor], ConvPerExample | None]] = []
        sq_norms = torch.zeros(n, dtype=torch.float64, device=device)
        # a DP algorithm's factors may depend on the whole batch: a Conv2d weight is deferred only to elementwise ones
        own = lambda norms, units, total: self._coef(norms, dtype)  # noqa: E731
        elementwise = own if self.clip_factors is None else self.chunk_factors
        defer = elementwise is not None
        for m, e in entries:
            assert e is not None
            # the loss is a mean over the n examples: each example's own gradient is n * (its share); every rule
            # is linear in g, so the factor goes on the squared norms (n^2) and the clip factors (n), not on g
            per = per_example(m, e, k, defer)  # Conv2d: per-unit norms and gradients (may drop e's captures)
            sq_norms += sq_norm(m, e, per).double() * (n * n)
            per_layer.append((m, e, per))
        captured = dict(entries)
        for emb, head in self._tied:  # |G_emb + G_head|^2 = |G_emb|^2 + |G_head|^2 + 2 <G_emb, G_head>
            sq_norms += tied_cross_sq(emb, captured[emb], captured[head]).double() * (n * n)  # type: ignore[arg-type]
        deferred = [(m, e["a"], e["g"]) for m, e, per in per_layer if per is not None and per.deferred]
        used = None
        if elementwise is not None:  # a large conv's weight: norms and clipped sum in one pass (deferred)
            used = clip_deferred(deferred, sq_norms, n, lambda norms, units: elementwise(norms, units, n).to(dtype), k)
        norms = sq_norms.clamp(min=0).sqrt()
        self.last_norms = norms.float()
        if self.clip_factors is not None:  # a DP algorithm's factors (one per unit; checked by the caller)
            coef = self.clip_factors(norms).to(dtype)
        else:
            coef = self._coef(norms, dtype)  # [n]
        if used is not None and not torch.equal(used, coef):  # not the factors the chunks used: recompute them
            for m, a, g in deferred:
                recompute_weight(m, a, g, coef * n, k)
        for m, e, per in per_layer:
            if per is not None and per.deferred:
                e.clear()  # the weight's clipped sum is written; the bias needs only per.bias
        coef = coef * n  # applied to the captured (mean-loss) gradients: see above
        shared: list[torch.Tensor] = [emb.weight for emb, _ in self._tied]
        for w in shared:
            w.grad = None
        for m, e, per in per_layer:
            before = [(w, w.grad) for w in shared if w.grad is not None and any(q is w for q in m.parameters(False))]
            write_clipped(m, e, per, coef)
            for w, g in before:  # a tied weight's clipped sum: both uses' contributions
                w.grad = w.grad + g  # type: ignore[operator]
        self.batches_clipped += 1

    def _coef(self, norms: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """DP-SGD's clip factors ``min(1, C / norm)``, elementwise (the same values chunk by chunk or at once)."""
        return (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0).to(dtype)


class _OutputTap(torch.autograd.Function):
    """Identity on a layer output that would need no gradient, put in the graph by a 0-dim ``anchor`` that requires
    grad: the backward reaches the layer's backward hook (which captures ``g``) and stops here, giving no gradient
    to anything. (Making the output itself a leaf that requires grad would keep it alive until the backward.)"""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:
        return None, None


def _padded_capture(m: nn.Module, pad: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    output: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The input a same-padding Conv2d convolves (``same_padding``), checked against the size of its output."""
    a = pad(x)
    assert isinstance(m, nn.Conv2d)
    size = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(a.shape[2:], m.kernel_size, m.stride, m.dilation)]
    if size != list(output.shape[2:]):
        raise RuntimeError(
            f"book-keeping clipping: {type(m).__name__} output {tuple(output.shape)} is not its convolution of the "
            f"padded input {tuple(a.shape)}: this timm version's forward differs from the rule. "
            f"Use `grad_sample_mode: hooks` or `functorch`."
        )
    return a


def _batch_size(m: nn.Module, e: dict[str, torch.Tensor] | None) -> int:
    assert e is not None
    return e["a"].shape[1] if isinstance(m, LSTMScan) else len(e["a"])


def _tied_pairs(layers: list[nn.Module]) -> list[tuple[nn.Embedding, nn.Module]]:
    """(embedding, Linear head) pairs sharing a trainable weight (checked by ``tied_reason`` at setup)."""
    embs = {m.weight: m for m in layers if isinstance(m, nn.Embedding) and m.weight.requires_grad}
    return [(embs[m.weight], m) for m in layers if isinstance(m, nn.Linear) and m.weight in embs]


def _unit_entry(m: nn.Module, e: dict[str, torch.Tensor] | None, k: int) -> dict[str, torch.Tensor]:
    assert e is not None
    if isinstance(m, nn.Conv2d | nn.GroupNorm):
        return e  # rows kept: per_example sums a unit's K rows (its rows_per_unit)
    return to_units(m, e, k, lstm=isinstance(m, LSTMScan))


__all__ = ["RULES", "BookKeeping", "check_supported", "uncovered_parameters"]
