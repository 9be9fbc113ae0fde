"""The baseline estimators, by name (an explicit registry): ``hgb`` and ``ensemble``. Both NON-private."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BaselineFactory = Callable[[int], Any]
BASELINES: dict[str, BaselineFactory] = {}


def register_baseline(name: str, factory: BaselineFactory) -> None:
    """Adds ``factory(seed) -> scikit-learn classifier`` (with ``fit`` and ``predict_proba``) under ``name``."""
    BASELINES[name] = factory


def make_baseline(name: str, seed: int) -> Any:
    """A fresh, unfitted estimator; raises ValueError naming the known baselines."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return BASELINES[name](seed)


def _hgb(seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(random_state=seed)


def _ensemble(seed: int) -> Any:
    """Soft voting over logistic regression, a random forest and gradient boosting (mean predicted probabilities)."""
    from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier, VotingClassifier
    from sklearn.linear_model import LogisticRegression

    return VotingClassifier(
        [
            ("logreg", LogisticRegression(max_iter=2000)),
            ("forest", RandomForestClassifier(n_estimators=200, min_samples_leaf=5, random_state=seed, n_jobs=1)),
            ("hgb", HistGradientBoostingClassifier(random_state=seed)),
        ],
        voting="soft",
    )


register_baseline("hgb", _hgb)
register_baseline("ensemble", _ensemble)

__all__ = ["BASELINES", "make_baseline", "register_baseline"]
