"""ResNet18 with GroupNorm, trained from scratch: a DP-safe ResNet (no layer mixes the examples of a batch)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with the largest divisor of ``channels`` that is <= ``max_groups`` as groups."""
    groups = max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class _OutOfPlaceBlock(BasicBlock):
    """torchvision's BasicBlock without in-place ops: ``out += identity`` and ``ReLU(inplace=True)`` modify the
    output of a hooked layer in place, which per-sample gradient hooks (``register_full_backward_hook``) refuse."""

    def forward(self, x: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, C', H', W']."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet18GN(nn.Module):
    """torchvision's ResNet18 with every BatchNorm replaced by GroupNorm, randomly initialised.

    Args:
        num_classes: Number of output logits.
        stem: ``imagenet``: 7x7 stride-2 convolution and max-pool (inputs of 64 pixels and more); ``cifar``: a 3x3
            stride-1 convolution and no pooling (32x32 inputs keep a 4x4 map before the last pooling).
        max_groups: Upper bound on the GroupNorm groups per layer (32 in Wu & He 2018).
        in_channels: Input channels.
    """

    def __init__(
        self,
        num_classes: int = 10,
        stem: Literal["imagenet", "cifar"] = "imagenet",
        max_groups: int = 32,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        from torchvision.models import resnet18

        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        net = resnet18(num_classes=num_classes, norm_layer=lambda c: group_norm(c, max_groups))
        if stem == "cifar":
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()  # type: ignore[assignment]
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        for module in net.modules():  # out-of-place, so that the per-sample gradient backends can hook every layer
            if isinstance(module, BasicBlock):
                module.__class__ = _OutOfPlaceBlock
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, C, H, W] -> logits [B, num_classes]."""
        return self.net(x)


__all__ = ["ResNet18GN", "group_norm"]
