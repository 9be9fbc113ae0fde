"""Disparate-impact report: per-group accuracy and privacy cost of DP runs against their non-DP twin.

Command line: ``dplit report RUN_DIR... --baseline NONDP_RUN_DIR...`` (see :mod:`dplit.report.cli`).
"""

from dplit.report.runs import ReportError, Run, load_run
from dplit.report.stats import Estimate, mean_ci, spearman_rho, t_quantile

__all__ = ["Estimate", "ReportError", "Run", "load_run", "mean_ci", "spearman_rho", "t_quantile"]
