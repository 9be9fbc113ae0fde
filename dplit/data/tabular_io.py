"""Readers of the canonical file formats of three credit/census datasets, and their UCI download.

Each reader returns ``dict[column -> np.ndarray]`` (strings for coded columns, float64 for numbers) and raises
:class:`~dplit.data.tabular.TabularFormatError` naming the file and line of a malformed row.

- Default of credit card clients (Taiwan, 2005): a CSV with header ``ID,X1,...,X23,Y`` (the layout of
  ``../shared/data/credit``); UCI ships an ``.xls``, which the download converts to that CSV (needs ``xlrd``).
- UCI Adult: ``adult.data`` / ``adult.test`` (comma+space separated, ``?`` missing, test labels end with ``.``,
  the test file starts with ``|1x3 Cross validator``).
- Statlog German credit: ``german.data`` (20 space-separated coded attributes and the class 1 = good, 2 = bad).
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np

from dplit.data.tabular import TabularFormatError
from dplit.download import download

UCI = "https://archive.ics.uci.edu"
CREDIT_FILE = "default_of_credit_card_clients.csv"
CREDIT_URL = f"{UCI}/static/public/350/default+of+credit+card+clients.zip"
CREDIT_COLUMNS = ["ID", *(f"X{i}" for i in range(1, 24)), "Y"]
ADULT_URL = f"{UCI}/ml/machine-learning-databases/adult"
ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation", "relationship",
    "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country", "income",
]  # fmt: skip
ADULT_NUMERIC = {"age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"}
GERMAN_FILE = "german.data"
GERMAN_URL = f"{UCI}/ml/machine-learning-databases/statlog/german/{GERMAN_FILE}"
GERMAN_COLUMNS = [f"A{i}" for i in range(1, 21)] + ["class"]
GERMAN_NUMERIC = {"A2", "A5", "A8", "A11", "A13", "A16", "A18", "class"}


def missing_message(path: Path, url: str, page: str) -> str:
    return (
        f"{path} not found. Download it from {page} (or set `data.init_args.download: true` to fetch {url}), or "
        f"point `data.init_args.root` (--data.init_args.root) at the folder that holds it."
    )


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise TabularFormatError(f"{path}, line {line}: column {column} is {text!r}, not a number") from None


def _columns(
    rows: list[list[str]], names: list[str], numeric: set[str], path: Path, lines: list[int]
) -> dict[str, np.ndarray]:
    """Columns of ``rows``: float64 for ``numeric`` names (a bad value names its line), else strings (object)."""
    table = np.array(rows, dtype=object).reshape(len(rows), len(names))
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        if name in numeric:
            try:
                out[name] = table[:, j].astype(np.float64)
            except ValueError:  # find the first bad cell, for the message
                out[name] = np.array([_number(path, n, name, r[j]) for r, n in zip(rows, lines, strict=True)])
        else:
            out[name] = table[:, j]
    return out


def read_credit_csv(path: str | Path) -> dict[str, np.ndarray]:
    """The Taiwan credit CSV (header ``ID,X1..X23,Y``); every value numeric (``5.00E+05`` allowed)."""
    path = Path(path)
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != CREDIT_COLUMNS:
            raise TabularFormatError(f"{path}, line 1: expected the header {','.join(CREDIT_COLUMNS)}, got {header}")
        rows, lines = [], []
        for row in reader:
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(CREDIT_COLUMNS):
                raise TabularFormatError(
                    f"{path}, line {reader.line_num}: expected {len(CREDIT_COLUMNS)} comma-separated fields, "
                    f"got {len(row)}"
                )
            rows.append([c.strip() for c in row])
            lines.append(reader.line_num)
    data = _columns(rows, CREDIT_COLUMNS, set(CREDIT_COLUMNS), path, lines)
    for name in ("X2", "X3", "X4"):  # coded columns: keep the documented codes as strings ("1", "2", ...)
        data[name] = np.array([str(int(v)) for v in data[name]], dtype=object)
    bad = np.flatnonzero(~np.isin(data["Y"], (0.0, 1.0)))
    if len(bad):
        raise TabularFormatError(f"{path}, line {lines[bad[0]]}: Y must be 0 or 1, got {data['Y'][bad[0]]:g}")
    return data


def read_adult(path: str | Path) -> dict[str, np.ndarray]:
    """``adult.data`` or ``adult.test``: 15 fields, ``?`` missing (kept as ``?``: the ``other`` category)."""
    path = Path(path)
    rows, lines = [], []
    with path.open(newline="") as handle:
        reader = csv.reader(handle, skipinitialspace=True)
        for fields in reader:
            if not fields or fields[0].startswith("|") or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank lines; the test file's "|1x3 Cross validator"
            n = reader.line_num
            if len(fields) != len(ADULT_COLUMNS):
                raise TabularFormatError(
                    f"{path}, line {n}: expected {len(ADULT_COLUMNS)} comma-separated fields, got {len(fields)}"
                )
            label = fields[-1].strip().rstrip(".")  # adult.test writes "<=50K."
            if label not in ("<=50K", ">50K"):
                raise TabularFormatError(f"{path}, line {n}: income must be <=50K or >50K, got {label!r}")
            fields[-1] = label
            rows.append(fields)
            lines.append(n)
    return _columns(rows, ADULT_COLUMNS, ADULT_NUMERIC, path, lines)


def read_german(path: str | Path) -> dict[str, np.ndarray]:
    """``german.data``: 20 attributes ``A1..A20`` and ``class`` (1 = good, 2 = bad), whitespace-separated."""
    path = Path(path)
    rows, lines = [], []
    with path.open(newline="") as handle:
        for n, raw in enumerate(handle, start=1):
            fields = raw.split()
            if not fields:
                continue
            if len(fields) != len(GERMAN_COLUMNS):
                raise TabularFormatError(
                    f"{path}, line {n}: expected {len(GERMAN_COLUMNS)} space-separated fields, got {len(fields)}"
                )
            if fields[-1] not in ("1", "2"):
                raise TabularFormatError(f"{path}, line {n}: class must be 1 (good) or 2 (bad), got {fields[-1]!r}")
            rows.append(fields)
            lines.append(n)
    return _columns(rows, GERMAN_COLUMNS, GERMAN_NUMERIC, path, lines)


# ---------------------------------------------------------------- downloads (UCI; never used by the tests)
def download_credit(root: str | Path) -> Path:
    """Fetches UCI's zip, reads its ``.xls`` (pandas + xlrd) and writes the CSV layout this reader parses."""
    root = Path(root)
    archive = download(CREDIT_URL, root / "default_of_credit_card_clients.zip", expect_zip=True)
    try:
        import pandas as pd
    except ImportError as err:
        raise RuntimeError(f"converting {archive} needs pandas and xlrd (pip install pandas xlrd)") from err
    with zipfile.ZipFile(archive) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".xls"))
        frame = pd.read_excel(io.BytesIO(zf.read(name)), header=1)  # row 0: X1..X23/Y, row 1: descriptive names
    frame.columns = CREDIT_COLUMNS
    dest = root / CREDIT_FILE
    frame.to_csv(dest, index=False)
    return dest


def download_adult(root: str | Path) -> None:
    for name in ("adult.data", "adult.test", "adult.names"):
        if not (Path(root) / name).is_file():
            download(f"{ADULT_URL}/{name}", Path(root) / name)


def download_german(root: str | Path) -> None:
    download(GERMAN_URL, Path(root) / GERMAN_FILE)


__all__ = [
    "download_adult",
    "download_credit",
    "download_german",
    "missing_message",
    "read_adult",
    "read_credit_csv",
    "read_german",
]
