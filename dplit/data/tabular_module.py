"""TabularDataModule: the grouped DataModule base of the tabular datasets (credit default, Adult, German credit).

A subclass supplies the column spec (``columns``), the group attributes it knows (``group_specs``), how to read its
files (``read``) and the target. The base chooses the group attributes and the domain, splits deterministically
(stratified by label and primary group, with ``split_seed``, never by feature values), fits nothing on validation or
test rows, and encodes features as ``dplit.data.tabular`` describes.

**Privacy of preprocessing.** The DP guarantee covers the private training split only. Statistics fitted on it
(means, stds, vocabularies, quantiles) would be released unprotected. The default ``preprocessing: spec`` fits
nothing: categories come from the documentation's codes, numbers are scaled by fixed ranges. ``source`` fits on the
public source domain (transfer setting). ``train`` fits on the training split, the usual non-private protocol: it
warns when a ``DifferentialPrivacy`` callback is active.

**Transfer.** ``domain_column`` names a group attribute (e.g. ``education``) and ``source_domain`` its groups that
form the *public* source domain; the rest is the private target domain. ``domain: source`` loads the source rows
(pretraining), ``domain: target`` the target rows (private fine-tuning), ``domain: all`` every row. Each domain is
split on its own with ``split_seed``, so the source's test rows never overlap the target's.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, GroupedTensorDataset
from dplit.data.tabular import Column, GroupSpec, Preprocessing, Scaler, encode, feature_width, stratified_split

log = logging.getLogger(__name__)
DPWarning = (
    "data.preprocessing: train fits the numeric scaling on the private training split, and these statistics are "
    "NOT covered by the DP guarantee; use `preprocessing: spec` (fixed ranges) or `source` (public source domain)"
)


_CACHE: OrderedDict[tuple, tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]] = OrderedDict()
_CACHE_SIZE = 4


def _freeze(*arrays: np.ndarray | None) -> None:
    for array in arrays:
        if array is not None:
            array.flags.writeable = False


class TabularDataModule(GroupedDataModule):
    """Grouped batches ``(x, y, group)`` from a tabular dataset: ``x`` float32 [B, num_features], ``y`` int64
    (1 = the documented positive class), ``group`` int64 [B] or [B, A] (``groups`` in order, first primary).

    Args:
        root: Folder holding the dataset's files (e.g. ``../shared/data/credit``).
        download: Fetch missing files from their UCI page into ``root``.
        groups: Group attributes, first the primary (see the subclass for the available ones).
        age_bands: Ages where the ``age`` attribute's bands start, e.g. [25, 40, 60] -> <25, 25-39, 40-59, 60+.
        domain_column: Group attribute that defines source/target domains (transfer); None: one domain.
        source_domain: Groups of ``domain_column`` that form the public source domain; the rest is the target.
        domain: Rows to load: ``all``, the public ``source`` domain or the private ``target`` domain.
        preprocessing: Numeric scaling: ``spec`` (fixed ranges, nothing fitted; default, DP-safe), ``source``
            (fitted on the public source domain's training rows) or ``train`` (fitted on the training split: not
            covered by DP, warns under DP).
        val_fraction: Share of (non-test) rows held out for validation.
        test_fraction: Share of rows held out for testing (ignored where the dataset has an official test file).
        split_seed: Seed of the stratified splits (fixed across experiment seeds so every run sees the same test set).
        batch_size: Training batch size (the DP callback replaces it with Poisson sampling of this expected size).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
    """

    columns: tuple[Column, ...] = ()
    dataset_name = "tabular"

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        groups: list[str] | None = None,
        age_bands: list[int] | None = None,
        domain_column: str | None = None,
        source_domain: list[str] | None = None,
        domain: Literal["all", "source", "target"] = "all",
        preprocessing: Preprocessing = "spec",
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int = 2048,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        self.root = root
        self.download = download
        self.age_bands = list(age_bands) if age_bands is not None else [25, 40, 60]
        self.specs = self.group_specs(self.age_bands)
        self.groups = list(groups) if groups is not None else ["sex", "age"]
        for name in [*self.groups, *([domain_column] if domain_column else [])]:
            if name not in self.specs:
                raise ValueError(
                    f"data.groups / data.domain_column: unknown group attribute {name!r} for {type(self).__name__}; "
                    f"available: {', '.join(self.specs)}"
                )
        if not self.groups or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"data.groups must name one or more distinct attributes, got {self.groups}")
        if domain not in ("all", "source", "target"):
            raise ValueError(f"data.domain must be all, source or target, got {domain!r}")
        if preprocessing not in ("spec", "train", "source"):
            raise ValueError(f"data.preprocessing must be spec, train or source, got {preprocessing!r}")
        if (domain != "all" or preprocessing == "source") and not (domain_column and source_domain):
            raise ValueError(
                "data.domain source/target and preprocessing: source need data.domain_column and "
                "data.source_domain (the groups of that column forming the public source domain)"
            )
        if domain_column and source_domain:
            unknown = set(source_domain) - set(self.specs[domain_column].names)
            if unknown:
                raise ValueError(
                    f"data.source_domain: {sorted(unknown)} not groups of {domain_column!r} "
                    f"({', '.join(self.specs[domain_column].names)})"
                )
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"data.val_fraction + data.test_fraction must be < 1, got {val_fraction}, {test_fraction}")
        self.domain_column, self.source_domain, self.domain = domain_column, list(source_domain or []), domain
        self.preprocessing = preprocessing
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.num_classes = 2
        self.num_features = feature_width(self.columns)
        self.group_attributes = {name: list(self.specs[name].names) for name in self.groups}
        self.train_class_counts: list[int] = []

    # ---------------------------------------------------------------- what a dataset supplies
    def group_specs(self, age_bands: Sequence[int]) -> dict[str, GroupSpec]:
        """Every group attribute the dataset offers (name -> spec)."""
        raise NotImplementedError

    def read(self, root: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
        """``(columns, y, official_test_mask or None)`` parsed from the files under ``root``."""
        raise NotImplementedError

    def fetch(self, root: Path) -> None:
        """Downloads the dataset's files into ``root``."""
        raise NotImplementedError

    def required_files(self) -> list[str]:
        return []

    def missing_message(self, path: Path) -> str:
        raise NotImplementedError

    # ---------------------------------------------------------------- loading
    def _root(self) -> Path:
        if self.root is None:
            raise FileNotFoundError(self.missing_message(Path("<data.root>") / self.required_files()[0]))
        return Path(self.root)

    def prepare_data(self) -> None:
        """Downloads missing files when ``download`` is set."""
        root = self._root()
        if self.download and any(not (root / f).is_file() for f in self.required_files()):
            self.fetch(root)

    def setup(self, stage: str | None = None) -> None:
        """Loads the splits; warns when statistics fitted on the private training split meet a DP callback."""
        if self.preprocessing == "train":
            callbacks = getattr(getattr(self, "trainer", None), "callbacks", None) or []
            if any(type(cb).__name__ == "DifferentialPrivacy" for cb in callbacks):
                log.warning(DPWarning)
        super().setup(stage)

    def _split(self, rows: np.ndarray, strata: np.ndarray, official_test: np.ndarray | None) -> list[np.ndarray]:
        """``[train, val, test]`` of ``rows`` (sorted row indices)."""
        if official_test is not None:
            test = rows[official_test[rows]]
            rest = rows[~official_test[rows]]
            val, train = stratified_split(rest, strata[rest], [self.val_fraction], self.split_seed)
            return [train, val, test]
        fractions = [self.test_fraction, self.val_fraction]
        test, val, train = stratified_split(rows, strata[rows], fractions, self.split_seed)
        return [train, val, test]

    def load_splits(self) -> dict[str, Dataset]:
        root = self._root()
        self.prepare_data()
        for name in self.required_files():
            if not (root / name).is_file():
                raise FileNotFoundError(self.missing_message(root / name))
        data, y, official_test = self._read_cached(root)
        ids = np.stack([self.specs[g].assign(data) for g in self.groups], axis=1)  # [N, A]
        strata = y * len(self.specs[self.groups[0]].names) + ids[:, 0]
        rows = np.arange(len(y))
        in_source = np.zeros(len(y), dtype=bool)
        if self.domain_column:
            spec = self.specs[self.domain_column]
            chosen = [spec.names.index(name) for name in self.source_domain]
            in_source = np.isin(spec.assign(data), chosen)
        if self.domain == "all":
            train, val, test = self._split(rows, strata, official_test)
        else:
            train, val, test = self._split(rows[in_source == (self.domain == "source")], strata, official_test)
        if self.preprocessing == "spec":
            scaler = Scaler.from_spec(self.columns)
        elif self.preprocessing == "train":
            scaler = Scaler.fit(self.columns, data, train)
        else:  # the public source domain's training rows
            scaler = Scaler.fit(self.columns, data, self._split(rows[in_source], strata, official_test)[0])
        group = torch.from_numpy(ids if len(self.groups) > 1 else ids[:, 0])
        target = torch.from_numpy(y.astype(np.int64))
        splits: dict[str, Dataset] = {}
        for name, part in (("train", train), ("val", val), ("test", test)):
            if len(part) == 0:
                raise ValueError(f"{type(self).__name__}: the {name} split is empty ({self.domain} domain)")
            x = torch.from_numpy(encode(self.columns, data, part, scaler))
            idx = torch.from_numpy(part)
            splits[name] = GroupedTensorDataset(x, target[idx], group[idx])
        self.train_class_counts = np.bincount(y[train], minlength=2).tolist()
        log.info("%s (%s domain, preprocessing %s): %d train / %d val / %d test rows", type(self).__name__,
                 self.domain, self.preprocessing, len(train), len(val), len(test))  # fmt: skip
        return splits

    def _read_cached(self, root: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None]:
        """``read(root)``, parsed once per process for unchanged files (key: class, paths, sizes, mtimes); the
        cached arrays are read-only, so no DataModule can alter another's copy."""
        stats = [(root / f).resolve().stat() for f in self.required_files()]
        key = (type(self), str(root.resolve()), tuple((st.st_size, st.st_mtime_ns, st.st_ino) for st in stats))
        if key not in _CACHE:
            data, y, official_test = self.read(root)
            _freeze(*data.values(), y, official_test)
            _CACHE[key] = (data, y, official_test)
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        _CACHE.move_to_end(key)
        data, y, official_test = _CACHE[key]
        return dict(data), y, official_test

    def arrays(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(x, y, group)`` of a split as numpy arrays (for scikit-learn baselines)."""
        dataset = self.splits()[split]
        assert isinstance(dataset, GroupedTensorDataset) and isinstance(dataset.x, torch.Tensor)
        return dataset.x.numpy(), dataset.y.numpy(), dataset.group.numpy()


__all__ = ["TabularDataModule"]
