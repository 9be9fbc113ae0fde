"""Empirical privacy auditing in one training run (Steinke, Nasr & Jagielski 2023): ``dplit audit``."""

from dplit.audit.bound import audit_from_scores, epsilon_lower_bound, log_binom_tail, p_value
from dplit.audit.canaries import AuditError, CanaryDataModule, canary_scores
from dplit.audit.cli import AuditResult, run_audit

__all__ = [
    "AuditError",
    "AuditResult",
    "CanaryDataModule",
    "audit_from_scores",
    "canary_scores",
    "epsilon_lower_bound",
    "log_binom_tail",
    "p_value",
    "run_audit",
]
