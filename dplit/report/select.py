"""Which run folder the report reads: given ``RUN``, its one completed training run ``RUN/version_N``.

``summary.json`` (written by ``dplit.callbacks.RunSummary``) says what each ``version_N`` is: audits, evaluations
(``dplit test`` / ``validate``) and failed or interrupted runs are never picked, and a folder holding several training
runs is refused with the list of candidates, since silently taking the newest once compared the wrong run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

_VERSION = re.compile(r"version_(\d+)")
SUMMARY_FILE = "summary.json"  # written by dplit.callbacks.RunSummary


class ReportError(Exception):
    """A problem with the runs given to ``dplit report``; the message names the run and the fix."""


def read_summary(version_dir: Path) -> dict[str, Any]:
    """``summary.json`` of a run folder ({} when absent or unreadable: runs written before it existed)."""
    try:
        data = json.loads((version_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def why_not_a_training_run(version_dir: Path) -> str | None:
    """None for a run the report may pick from its parent folder, else why not (failed, audit, evaluation...)."""
    if not (version_dir / "metrics.csv").is_file():
        return "no metrics.csv (the run stopped before logging anything)"
    summary = read_summary(version_dir)
    status, kind = summary.get("status"), summary.get("kind")
    if status not in (None, "completed"):
        error = f": {summary['error']}" if summary.get("error") else ""
        return f"{status}{error}"[:160]
    if kind == "audit":
        return "a `dplit audit` canary run"
    if kind not in (None, "fit"):
        return f"a `dplit {kind}` evaluation, not a training run"
    return None


def describe_run(version_dir: Path) -> str:
    """One line about a run folder for lists of candidates: name, kind, status, epsilon, accuracy."""
    summary = read_summary(version_dir)
    parts = [str(version_dir)]
    if summary:
        parts.append(f"{summary.get('kind', '?')} {summary.get('status', '?')}")
        privacy = summary.get("privacy") or {}
        if privacy.get("epsilon") is not None:
            parts.append(f"epsilon {float(privacy['epsilon']):.3g}")
        if summary.get("acc") is not None:
            parts.append(f"{summary.get('split', 'val')} acc {100 * float(summary['acc']):.1f}%")
    else:
        parts.append("no summary.json" if (version_dir / "metrics.csv").is_file() else "empty")
    return ", ".join(parts)


def find_version_dir(path: Path) -> Path:
    """``path`` itself if it holds ``metrics.csv``, else its one completed training run ``version_N``.

    Raises ReportError listing the candidates when ``path`` holds several training runs, or none (then with the
    reason each ``version_N`` was skipped).
    """
    if not path.is_dir():
        raise ReportError(f"{path}: no such run directory (pass RUN or RUN/version_N written by `dplit fit`)")
    if (path / "metrics.csv").is_file():
        return path
    versions = sorted((int(m.group(1)), d) for d in path.iterdir() if d.is_dir() and (m := _VERSION.fullmatch(d.name)))
    if not versions:
        return path
    if not any((d / "metrics.csv").is_file() for _, d in versions):
        return versions[-1][1]  # load_run says that no metrics.csv was written, and which logger writes one
    usable = [d for _, d in versions if why_not_a_training_run(d) is None]
    if len(usable) == 1:
        return usable[0]
    if not usable:
        skipped = "; ".join(f"{d.name}: {why_not_a_training_run(d)}" for _, d in versions)
        raise ReportError(
            f"{path}: no completed training run in it ({skipped}). Train one with `dplit fit`, or pass a "
            "RUN/version_N folder explicitly to read it anyway"
        )
    listing = "\n  ".join(describe_run(d) for d in usable)
    raise ReportError(
        f"{path} holds {len(usable)} training runs; pass the one to compare (RUN/version_N):\n  {listing}"
    )


__all__ = ["SUMMARY_FILE", "ReportError", "describe_run", "find_version_dir", "read_summary", "why_not_a_training_run"]
