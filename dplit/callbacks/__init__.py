"""Lightning callbacks: thin adapters over dplit's privacy core and metrics."""

from dplit.callbacks.fairness import SubgroupMetrics
from dplit.callbacks.privacy import DifferentialPrivacy

__all__ = ["DifferentialPrivacy", "SubgroupMetrics"]
