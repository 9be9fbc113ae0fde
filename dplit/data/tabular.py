"""Typed column specs, privacy-aware preprocessing and deterministic stratified splits for tabular data.

Preprocessing turns parsed columns into a float32 matrix. Categorical columns are one-hot encoded over the codes the
dataset's documentation lists, plus one ``other`` column for undocumented or missing codes, so the input width
never depends on the data. Numeric columns are transformed (optionally a signed ``log1p``) and then scaled in one of
three ways (``Preprocessing``):

- ``spec``: by the column's fixed range from the spec (documented or chosen a priori), clipped to [-1, 1]. Nothing
  is fitted on any data: the default, and the only choice whose release is covered by a DP guarantee.
- ``train``: standardised with the mean/std of the training split (the usual non-private protocol). Under DP these
  statistics are an unprotected release of the private training data; the DataModule warns.
- ``source``: standardised with the mean/std of the public source domain's training split (transfer setting).

Statistics are never fitted on validation or test rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Preprocessing = Literal["spec", "train", "source"]


class TabularFormatError(ValueError):
    """A malformed row in a dataset file; the message names the file and the line number."""


@dataclass(frozen=True)
class Categorical:
    """A coded column, one-hot encoded over ``codes`` plus one ``other`` column (undocumented or missing codes)."""

    name: str
    codes: tuple[str, ...]

    @property
    def width(self) -> int:
        return len(self.codes) + 1


@dataclass(frozen=True)
class Numeric:
    """A numeric column and its fixed range ``[low, high]`` (in the original unit); ``log``: signed ``log1p`` first."""

    name: str
    low: float
    high: float
    log: bool = False

    width = 1

    def transform(self, values: np.ndarray) -> np.ndarray:
        v = values.astype(np.float64)
        return np.sign(v) * np.log1p(np.abs(v)) if self.log else v

    def fixed_range(self) -> tuple[float, float]:
        lo, hi = self.transform(np.array([self.low, self.high]))
        return float(lo), float(hi)


Column = Categorical | Numeric


@dataclass(frozen=True)
class GroupSpec:
    """A group attribute: its group names and how ids [N] are assigned from the parsed columns."""

    name: str
    names: tuple[str, ...]
    assign: Callable[[dict[str, np.ndarray]], np.ndarray]


def feature_width(columns: Sequence[Column]) -> int:
    """Number of model inputs the columns encode to (known without reading any data)."""
    return sum(c.width for c in columns)


def feature_names(columns: Sequence[Column]) -> list[str]:
    """One name per encoded input, e.g. ``sex=2``, ``sex=other``, ``age``."""
    names: list[str] = []
    for c in columns:
        if isinstance(c, Categorical):
            names += [f"{c.name}={code}" for code in c.codes] + [f"{c.name}=other"]
        else:
            names.append(c.name)
    return names


@dataclass
class Scaler:
    """Per numeric column ``(offset, scale)`` with ``x' = (t(x) - offset) / scale``; ``clip`` for fixed ranges."""

    offsets: dict[str, float]
    scales: dict[str, float]
    clip: bool

    @classmethod
    def from_spec(cls, columns: Sequence[Column]) -> Scaler:
        """Data-independent: the fixed range ``[lo, hi]`` maps to [-1, 1]."""
        offsets, scales = {}, {}
        for c in columns:
            if isinstance(c, Numeric):
                lo, hi = c.fixed_range()
                offsets[c.name], scales[c.name] = (lo + hi) / 2, max((hi - lo) / 2, 1e-12)
        return cls(offsets, scales, clip=True)

    @classmethod
    def fit(cls, columns: Sequence[Column], data: dict[str, np.ndarray], rows: np.ndarray) -> Scaler:
        """Mean and std of ``rows`` only (training rows of the private or the public source domain)."""
        if len(rows) == 0:
            raise ValueError("cannot fit preprocessing statistics on zero rows")
        offsets, scales = {}, {}
        for c in columns:
            if isinstance(c, Numeric):
                t = c.transform(data[c.name][rows])
                std = float(t.std())
                offsets[c.name], scales[c.name] = float(t.mean()), std if std > 0 and math.isfinite(std) else 1.0
        return cls(offsets, scales, clip=False)


def encode(columns: Sequence[Column], data: dict[str, np.ndarray], rows: np.ndarray, scaler: Scaler) -> np.ndarray:
    """The float32 feature matrix [len(rows), feature_width(columns)] of ``rows``."""
    parts: list[np.ndarray] = []
    for c in columns:
        values = data[c.name][rows]
        if isinstance(c, Categorical):
            index = {code: i for i, code in enumerate(c.codes)}
            distinct, inverse = np.unique(values.astype(str), return_inverse=True)
            ids = np.array([index.get(v, len(c.codes)) for v in distinct], dtype=np.int64)[inverse.reshape(-1)]
            parts.append(np.eye(c.width, dtype=np.float32)[ids])
        else:
            t = (c.transform(values) - scaler.offsets[c.name]) / scaler.scales[c.name]
            parts.append((np.clip(t, -1.0, 1.0) if scaler.clip else t).astype(np.float32)[:, None])
    return np.concatenate(parts, axis=1) if parts else np.zeros((len(rows), 0), np.float32)


def stratified_split(rows: np.ndarray, strata: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Splits ``rows`` into ``len(fractions) + 1`` sorted parts (the last takes the rest), stratified by ``strata``.

    Deterministic given ``seed``: depends only on the rows' order and strata, never on feature values. Each stratum
    is shuffled and cut in the given proportions (rounded), so every part keeps the strata's proportions.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for value in np.unique(strata):
        members = rows[strata == value]
        members = members[rng.permutation(len(members))]
        start = 0
        for i, fraction in enumerate(fractions):
            take = int(round(fraction * len(members)))
            parts[i].append(members[start : start + take])
            start += take
        parts[-1].append(members[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def age_band_names(edges: Sequence[int]) -> tuple[str, ...]:
    """``[25, 40, 60]`` -> ``("<25", "25-39", "40-59", "60+")``."""
    if not edges or list(edges) != sorted(set(edges)):
        raise ValueError(f"data.age_bands must be increasing ages, got {list(edges)}")
    inner = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return (f"<{edges[0]}", *inner, f"{edges[-1]}+")


def age_band_ids(age: np.ndarray, edges: Sequence[int]) -> np.ndarray:
    return np.searchsorted(np.asarray(edges), age.astype(np.float64), side="right").astype(np.int64)


def code_groups(column: str, mapping: dict[str, int]) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A group assignment from a coded column: ``mapping`` code -> id; unlisted codes get the last id + 1."""
    fallback = max(mapping.values()) + 1

    def assign(data: dict[str, np.ndarray]) -> np.ndarray:
        distinct, inverse = np.unique(data[column].astype(str), return_inverse=True)
        return np.array([mapping.get(v, fallback) for v in distinct], dtype=np.int64)[inverse.reshape(-1)]

    return assign


__all__ = [
    "Categorical",
    "Column",
    "GroupSpec",
    "Numeric",
    "Preprocessing",
    "Scaler",
    "TabularFormatError",
    "age_band_ids",
    "age_band_names",
    "code_groups",
    "encode",
    "feature_names",
    "feature_width",
    "stratified_split",
]
