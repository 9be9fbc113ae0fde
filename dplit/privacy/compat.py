"""Model checks and fixes for DP training: no layer may mix examples, every trainable layer needs per-sample grads."""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn

from dplit.privacy.coverage import check_coverage

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class IncompatibleModelError(ValueError):
    """The model cannot be trained with differential privacy as it is."""


def batchnorm_layers(module: nn.Module) -> list[str]:
    """Names of all BatchNorm layers, trainable or frozen.

    Frozen BatchNorm is refused too: in training mode it still normalises each example with its batch peers'
    statistics, so one example's presence changes every other example's gradient (invariant 3).
    """
    return [name or "<root>" for name, m in module.named_modules() if isinstance(m, _BATCHNORM)]


def replace_batchnorm(module: nn.Module, max_groups: int = 32) -> list[str]:
    """Replace every BatchNorm layer by a GroupNorm over the same channels, in place.

    The number of groups is the largest divisor of the channel count that is <= ``max_groups`` (Opacus' fixer
    uses gcd(32, C), which degrades to 1 group for odd channel counts; the largest divisor is the same for
    powers of two and better otherwise). Affine parameters are re-initialised. A layer that also applies an
    activation (timm's ``BatchNormAct2d``) becomes ``Sequential(GroupNorm, [dropout,] activation)``.

    Returns:
        The names of the replaced layers.
    """
    replaced = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, _BATCHNORM) or not name:
            continue
        channels = child.num_features
        groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
        new = nn.GroupNorm(groups, channels, affine=child.affine)
        if child.weight is not None:
            new.to(device=child.weight.device, dtype=child.weight.dtype)
            new.requires_grad_(child.weight.requires_grad)
        # timm's BatchNormAct2d (a BatchNorm2d subclass) applies its dropout and activation inside: keep them
        extras = [getattr(child, a) for a in ("drop", "act") if isinstance(getattr(child, a, None), nn.Module)]
        extras = [m for m in extras if not isinstance(m, nn.Identity)]
        replacement: nn.Module = nn.Sequential(new, *extras) if extras else new
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, replacement)
        replaced.append(name)
    if isinstance(module, _BATCHNORM):
        raise IncompatibleModelError("The model itself is a BatchNorm layer; wrap it in a container to replace it.")
    return replaced


def check_model(module: nn.Module, grad_sample_mode: str = "hooks") -> None:
    """Raise ``IncompatibleModelError`` listing every layer that breaks DP training, with the fix for each.

    Args:
        module: the model (a LightningModule or plain nn.Module).
        grad_sample_mode: ``hooks``/``ghost`` need a registered per-sample-gradient rule for each trainable layer
            (or fall back to functorch, which Opacus does automatically); ``functorch`` handles any layer.
    """
    problems: list[str] = []
    for name in batchnorm_layers(module):
        problems.append(
            f"'{name}' is a BatchNorm layer, which mixes the examples of a batch (a privacy leak). Fix: set "
            "`replace_batchnorm: true` on dplit.callbacks.DifferentialPrivacy (swaps in GroupNorm, see "
            "dplit.privacy.compat.replace_batchnorm), or freeze it for the whole run as a layer with no training mode "
            "(`dplit.models.TimmBackbone(batchnorm: frozen)`, timm's `freeze_batch_norm_2d`), or use a model with "
            "GroupNorm/LayerNorm."
        )
    modes = {m: m.training for m in module.modules()}  # each submodule's own mode, restored as it was
    module.train()
    try:
        errors = ModuleValidator.validate(module, strict=False)
    finally:
        for m, training in modes.items():
            m.training = training
    for err in errors:
        text = str(err)
        if "BatchNorm" in text:
            continue  # reported above, with our fix
        if "LSTM" in text or "GRU" in text or "RNN" in text:
            text += " Fix: use opacus-compatible recurrent layers (dplit models for text tasks provide them)."
        problems.append(text)
    buffers = [
        f"'{name}' ({type(m).__name__}) is trainable and has buffers ({', '.join(b for b, _ in m.named_buffers())}); "
        "running statistics computed from training data are not protected by DP. Freeze the layer or remove the "
        "buffers."
        for name, m in module.named_modules()
        if not isinstance(m, _BATCHNORM)
        and any(p.requires_grad for p in m.parameters(recurse=False))
        and any(True for _ in m.buffers(recurse=False))
    ]
    problems.extend(buffers)
    if not any(p.requires_grad for p in module.parameters()):
        problems.append("the model has no trainable parameters.")
    if problems:
        raise IncompatibleModelError(
            "The model cannot be trained with differential privacy:\n- " + "\n- ".join(problems)
        )


def prepare_model(module: nn.Module, grad_sample_mode: str, fix_batchnorm: bool = False) -> list[str]:
    """Everything checked on the model before DP training, with BatchNorm replaced first if asked.

    Returns:
        The names of replaced BatchNorm layers.

    Raises:
        IncompatibleModelError: a layer mixes examples or has no per-sample gradient rule in this mode, or ghost
            clipping is asked of a task without a ``criterion`` module.
    """
    replaced = replace_batchnorm(module) if fix_batchnorm else []
    try:  # per trainable parameter (invariant 6); first, so that every refusal names the parameter
        check_coverage(module, grad_sample_mode)
    except ValueError as err:
        raise IncompatibleModelError(str(err)) from None
    check_model(module, grad_sample_mode)
    if grad_sample_mode == "ghost" and not isinstance(getattr(module, "criterion", None), nn.Module):
        raise IncompatibleModelError(
            "`grad_sample_mode: ghost` needs the task to compute its training loss through `self.criterion` "
            f"(an nn.Module); {type(module).__name__} has none."
        )
    return replaced


def trainable_parameter_count(module: nn.Module) -> int:
    """Number of trainable scalars (used in logs and benchmarks)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "IncompatibleModelError",
    "batchnorm_layers",
    "check_model",
    "prepare_model",
    "replace_batchnorm",
    "trainable_parameter_count",
]
