"""Lightning callbacks: thin adapters over dplit's privacy core and metrics, and the end-of-run summary."""

from dplit.callbacks.ema import EMAWeights
from dplit.callbacks.fairness import SubgroupMetrics
from dplit.callbacks.privacy import DifferentialPrivacy
from dplit.callbacks.progress import VersionProgressBar, VersionRichProgressBar
from dplit.callbacks.summary import RunSummary

__all__ = [
    "DifferentialPrivacy",
    "EMAWeights",
    "RunSummary",
    "SubgroupMetrics",
    "VersionProgressBar",
    "VersionRichProgressBar",
]
