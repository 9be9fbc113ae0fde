"""dplit: differentially private training with PyTorch Lightning and per-subgroup fairness metrics."""

__version__ = "0.1.0"
