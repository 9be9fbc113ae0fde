"""Lightning callbacks: thin adapters over dplit's privacy core and metrics, and the end-of-run summary."""

from dplit.callbacks.fairness import SubgroupMetrics
from dplit.callbacks.privacy import DifferentialPrivacy
from dplit.callbacks.progress import VersionProgressBar, VersionRichProgressBar
from dplit.callbacks.summary import RunSummary

__all__ = ["DifferentialPrivacy", "RunSummary", "SubgroupMetrics", "VersionProgressBar", "VersionRichProgressBar"]
