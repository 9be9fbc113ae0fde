"""Refuses a trainable parameter used OUTSIDE the forward of the layer that owns it, where no per-example rule sees it.

Every per-sample backend (Opacus hooks / ghost / functorch rules, book-keeping) attributes a parameter's per-example
gradient to the layer that owns it, from that layer's own forward (its inputs and output gradients). A parameter read
by another module's code, e.g. a tied decoder written as ``h @ self.emb.weight.T`` in a model's forward, contributes
a gradient that no rule sees: the per-example norm misses it and one example can move the model by more than C (the
sensitivity zoo's ``functional_tied_nobias`` model measured this for all four backends before this guard).

:class:`OutsideUseGuard` wraps the task's ``training_step`` for the first few non-empty training steps and, under a
``TorchFunctionMode``, records every op that takes a trainable parameter and yields a tensor that requires grad while
the innermost running module is not one of the parameter's owners. Uses with no module running (a loss term in
``training_step`` itself) are not recorded. At the end of the step it raises :class:`UncoveredParameterError` naming
the parameter, the op and the module that used it; nothing has been clipped, noised or accounted at that point.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from dplit.privacy.coverage import UncoveredParameterError


class _UseMode(TorchFunctionMode):
    def __init__(self, guard: OutsideUseGuard) -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        guard = self.guard
        if guard.stack and any(isinstance(o, torch.Tensor) and o.requires_grad for o in tree_leaves(out)):
            top = guard.stack[-1]
            for t in tree_leaves((args, kwargs)):
                owners = guard.owners.get(id(t)) if isinstance(t, nn.Parameter) else None
                if owners is not None and top not in owners:
                    guard.record(t, func, top)
        return out


class OutsideUseGuard:
    """Checks the first ``steps`` non-empty training steps of ``pl_module`` (see the module docstring).

    Args:
        pl_module: the LightningModule (its ``training_step`` is wrapped on the instance; ``remove()`` restores it).
        steps: how many training steps to check (a forward's control flow rarely changes between steps).
    """

    def __init__(self, pl_module: Any, steps: int = 2) -> None:
        self.module = pl_module
        self.steps_left = steps
        self.stack: list[nn.Module] = []
        self.names = {m: name or "<root>" for name, m in pl_module.named_modules()}
        self.owners: dict[int, set[nn.Module]] = {}
        self.param_names: dict[int, str] = {}
        for mname, m in pl_module.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                if p.requires_grad:
                    self.owners.setdefault(id(p), set()).add(m)
                    self.param_names.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
        self.found: dict[str, str] = {}
        self.skip_next = False
        original = pl_module.training_step

        def training_step(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
            if self.steps_left <= 0 or self.skip_next:
                return original(*args, **kwargs)
            self.steps_left -= 1
            handles = self._attach()
            try:
                with _UseMode(self):
                    out = original(*args, **kwargs)
            finally:
                for h in handles:
                    h.remove()
                self.stack.clear()
            self._raise_if_found()
            return out

        pl_module.training_step = types.MethodType(training_step, pl_module)

    def _attach(self) -> list[Any]:
        handles = []
        for m in self.module.modules():
            handles.append(m.register_forward_pre_hook(lambda mod, _: self.stack.append(mod), prepend=True))
            handles.append(m.register_forward_hook(lambda mod, _i, _o: self._pop(mod), always_call=True))
        return handles

    def _pop(self, module: nn.Module) -> None:
        if self.stack and self.stack[-1] is module:
            self.stack.pop()

    def record(self, param: nn.Parameter, func: Any, module: nn.Module) -> None:
        name = self.param_names[id(param)]
        if name not in self.found:
            owners = " and ".join(sorted(self.names.get(m, "?") for m in self.owners[id(param)]))
            op = getattr(func, "__name__", str(func))
            where = self.names.get(module, "?")
            self.found[name] = f"{name} (owned by {owners}) used by `{op}` in the forward of {where}"

    def _raise_if_found(self) -> None:
        if not self.found:
            return
        raise UncoveredParameterError(
            "DifferentialPrivacy: trainable parameters are used outside the layer that owns them: "
            + "; ".join(self.found.values())
            + ". Per-example clipping sees a parameter only through its own layer's forward, so this use would escape "
            "clipping. Call the owning layer instead (e.g. tie a decoder as an nn.Linear: `head.weight = emb.weight`), "
            "or freeze the parameter."
        )

    def remove(self) -> None:
        """Restore the task's own ``training_step``."""
        self.module.__dict__.pop("training_step", None)


__all__ = ["OutsideUseGuard"]
