"""CheXpert (Irvin et al. 2019): chest X-rays with 14 findings labelled 1 / 0 / -1 (uncertain) / blank, and groups.

Files, as released (``CheXpert-v1.0`` or the downsampled ``CheXpert-v1.0-small``): ``train.csv`` and ``valid.csv``
with the columns ``Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,...,Support Devices``, where ``Path`` is
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` (relative to the folder that holds the
release's folder; both that folder and the release folder itself are accepted as ``root``).

Label policy (Irvin et al. 2019, section 4): ``uncertain`` maps -1 to 1 (``ones``, U-Ones), 0 (``zeros``, U-Zeros)
or leaves it out of the loss and the metrics (``ignore``, U-Ignore); ``blank`` (the finding was not mentioned) maps
to 0 (``zeros``, the usual reading) or is left out (``ignore``). Left-out labels are -1 in the targets.

Groups: ``sex`` (primary; the CSV's ``Sex``), ``age`` bands of the CSV's ``Age`` and, given a ``demographics`` table,
``race``: the CHEXPERT DEMO table (Stanford AIMI) joined by patient id. That table is released as ``.xlsx``, which
needs ``openpyxl`` (not a dplit dependency): export it to CSV first (columns ``PATIENT,GENDER,AGE_AT_CXR,
PRIMARY_RACE,ETHNICITY``; the path may also point at a ``.xlsx`` when openpyxl is installed). ``PRIMARY_RACE`` is
coarsened to White / Black / Asian / Other / Unknown (e.g. "White, non-Hispanic" -> White, "Asian - Historical
Conv" -> Asian, "Patient Refused" or a patient missing from the table -> Unknown).

The privacy unit is one image: a patient with several studies contributes several images, so the guarantee is
per image, not per patient.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FINDINGS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices"]  # fmt: skip
COMPETITION = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion"]
SEXES = ["Female", "Male"]
RACES = ["White", "Black", "Asian", "Other", "Unknown"]
POLICIES = {"uncertain": ("ones", "zeros", "ignore"), "blank": ("zeros", "ignore")}
_PATIENT = re.compile(r"(patient\d+)")
WHERE = (
    "Get CheXpert (the CheXpert-v1.0-small release is enough) from https://stanfordmlgroup.github.io/competitions/"
    "chexpert/ (Stanford AIMI, research use) and pass the folder that holds train.csv and valid.csv (or its parent) "
    "with `--data.root`; the optional demographics (CHEXPERT DEMO.xlsx, exported to CSV) with `--data.demographics`."
)


def coarse_race(value: str) -> str:
    """``PRIMARY_RACE`` of the demographics table -> one of :data:`RACES`."""
    text = value.strip().lower()
    if not text or "unknown" in text or "refused" in text or "declined" in text:
        return "Unknown"
    for race in ("White", "Black", "Asian"):
        if race.lower() in text:
            return race
    return "Other"


def read_demographics(path: str | Path) -> dict[str, str]:
    """Patient id -> coarse race from the CHEXPERT DEMO table (CSV; ``.xlsx`` only with openpyxl installed).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the table lacks ``PATIENT`` or ``PRIMARY_RACE``, or is an ``.xlsx`` without openpyxl.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CheXpert demographics: no file {path}. {WHERE}")
    if path.suffix.lower() in (".xlsx", ".xls"):
        try:
            import openpyxl  # noqa: F401
        except ImportError:
            raise ValueError(f"CheXpert demographics: {path} is an Excel file and openpyxl is not installed: export "
                             "it to CSV (same columns) or `pip install openpyxl`") from None  # fmt: skip
        import pandas as pd

        rows = pd.read_excel(path).astype(str).to_dict("records")
        columns = set(rows[0]) if rows else set()
    else:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or [])
            rows = list(reader)
    missing = {"PATIENT", "PRIMARY_RACE"} - columns
    if missing:
        raise ValueError(f"CheXpert demographics: {path} lacks the columns {sorted(missing)} (has {sorted(columns)})")
    return {str(r["PATIENT"]).strip(): coarse_race(str(r["PRIMARY_RACE"] or "")) for r in rows}


@dataclass
class CheXpertTable:
    """One label file: image paths, targets [N, L] (1, 0 or -1 = left out), sex, age, patient ids, skipped rows."""

    files: list[Path]
    target: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    patients: list[str]
    bad: list[str] = field(default_factory=list)


def _label(cell: str, uncertain: str, blank: str) -> float | None:
    """One label cell -> 1, 0 or -1 (left out) under the policies; None for a value that is not CheXpert's."""
    cell = cell.strip()
    if cell == "":
        return 0.0 if blank == "zeros" else -1.0
    try:
        value = float(cell)
    except ValueError:
        return None
    if value == -1.0:
        return {"ones": 1.0, "zeros": 0.0, "ignore": -1.0}[uncertain]
    return value if value in (0.0, 1.0) else None


def resolve_image(root: Path, relative: str) -> Path:
    """``root/relative``, or ``root/relative`` without its first part when ``root`` is the release folder itself."""
    direct = root / relative
    if direct.exists():
        return direct
    parts = Path(relative).parts
    return root.joinpath(*parts[1:]) if len(parts) > 1 and parts[0].lower().startswith("chexpert") else direct


def read_chexpert_csv(path: Path, root: Path, labels: list[str], uncertain: str, blank: str,
                      frontal_only: bool) -> CheXpertTable:  # fmt: skip
    """Reads ``train.csv`` or ``valid.csv``; rows with an unknown sex, age or label value are skipped and reported.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: it lacks CheXpert's columns.
    """
    if not path.is_file():
        raise FileNotFoundError(f"CheXpert: no {path}. {WHERE}")
    files, target, sex, age, patients, bad = [], [], [], [], [], []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"Path", "Sex", "Age", "Frontal/Lateral", *labels} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"CheXpert: {path} lacks the columns {sorted(missing)} (has {reader.fieldnames})")
        for row in reader:
            if frontal_only and row["Frontal/Lateral"].strip() != "Frontal":
                continue
            values = [_label(row[name] or "", uncertain, blank) for name in labels]
            patient = _PATIENT.search(row["Path"] or "")
            age_cell = (row["Age"] or "").strip()
            if None in values or row["Sex"] not in SEXES or not age_cell.isdigit() or patient is None:
                bad.append(",".join(str(v) for v in row.values()))
                continue
            files.append(resolve_image(root, row["Path"]))
            target.append(values)
            sex.append(SEXES.index(row["Sex"]))
            age.append(int(age_cell))
            patients.append(patient.group(1))
    if bad:
        log.warning("CheXpert: skipped %d of %d rows of %s (sex not Female/Male, age not a number, a label not "
                    "1/0/-1/blank, or no patient id in Path), e.g. %s", len(bad), len(bad) + len(files), path.name,
                    " | ".join(bad[:2]))  # fmt: skip
    return CheXpertTable(files, np.asarray(target, dtype=np.float32).reshape(-1, len(labels)),
                         np.asarray(sex, dtype=np.int64), np.asarray(age, dtype=np.int64), patients, bad)  # fmt: skip


__all__ = ["COMPETITION", "FINDINGS", "RACES", "SEXES", "CheXpertTable", "coarse_race", "read_chexpert_csv",
           "read_demographics", "resolve_image"]  # fmt: skip
