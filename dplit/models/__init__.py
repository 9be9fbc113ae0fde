"""Plain ``nn.Module`` backbones (no Lightning, no DP code)."""

from dplit.models.cnn import MnistCNN

__all__ = ["MnistCNN"]
