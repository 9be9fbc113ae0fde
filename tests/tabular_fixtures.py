"""Tiny tabular datasets in the real file formats (Taiwan credit CSV, UCI Adult, Statlog German credit), and the
arguments that point a tabular config at the real files under ../shared/data when present, else at these fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from dplit.data.tabular_datasets import ADULT_CODES, GERMAN_COLUMNS_SPEC
from dplit.data.tabular_io import CREDIT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
REAL = {
    "CreditDefaultDataModule": SHARED / "credit",
    "AdultDataModule": SHARED / "tabular" / "adult",
    "GermanCreditDataModule": SHARED / "tabular" / "german",
}


def write_credit(root: Path, n: int = 400, seed: int = 0) -> Path:
    """``default_of_credit_card_clients.csv``: header ``ID,X1..X23,Y``, CRLF, some ``5.00E+05`` values; the label
    depends on the repayment status (X6) so models can learn."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = [",".join(CREDIT_COLUMNS)]
    for i in range(n):
        pay = rng.integers(-2, 9, size=6)
        bills = rng.integers(-5000, 300000, size=6)
        paid = rng.integers(0, 50000, size=6)
        limit = "5.00E+05" if i % 17 == 0 else str(int(rng.integers(1, 50)) * 10000)
        default = int(pay[0] >= 2 or rng.random() < 0.1)
        values = [str(i + 1), limit, str(rng.integers(1, 3)), str(rng.choice([0, 1, 2, 3, 4, 5, 6])),
                  str(rng.integers(0, 4)), str(rng.integers(21, 80)), *map(str, pay), *map(str, bills),
                  *map(str, paid), str(default)]  # fmt: skip
        lines.append(",".join(values))
    path = root / "default_of_credit_card_clients.csv"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


def _adult_row(rng: np.random.Generator, test: bool) -> str:
    pick = {k: [c.strip() for c in v.split(",")] for k, v in ADULT_CODES.items()}
    sex = str(rng.choice(pick["sex"]))
    edu_num = int(rng.integers(1, 17))
    rich = edu_num >= 13 and rng.random() < 0.7 or rng.random() < 0.1
    label = (">50K" if rich else "<=50K") + ("." if test else "")
    workclass = "?" if rng.random() < 0.05 else str(rng.choice(pick["workclass"]))
    education = str(rng.choice(pick["education"]))
    fields = [str(rng.integers(17, 91)), workclass, str(rng.integers(20000, 900000)), education, str(edu_num),
              str(rng.choice(pick["marital-status"])), str(rng.choice(pick["occupation"])),
              str(rng.choice(pick["relationship"])), str(rng.choice(pick["race"])), sex,
              str(int(rng.integers(0, 2)) * 5000), "0", str(rng.integers(10, 80)), "United-States", label]  # fmt: skip
    return ", ".join(fields)


def write_adult(root: Path, n_train: int = 300, n_test: int = 150, seed: int = 0) -> Path:
    """``adult.data`` and ``adult.test`` (first line ``|1x3 Cross validator``, labels ending with ``.``)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "adult.data").write_text("\n".join(_adult_row(rng, False) for _ in range(n_train)) + "\n\n")
    test = ["|1x3 Cross validator", *(_adult_row(rng, True) for _ in range(n_test))]
    (root / "adult.test").write_text("\n".join(test) + "\n")
    return root


def write_german(root: Path, n: int = 300, seed: int = 0) -> Path:
    """``german.data``: 20 coded attributes and the class (1 good, 2 bad), space-separated."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    numeric = {"A2": (4, 72), "A5": (250, 18000), "A8": (1, 4), "A11": (1, 4), "A13": (19, 75), "A16": (1, 4),
               "A18": (1, 2)}  # fmt: skip
    lines = []
    for _ in range(n):
        row = []
        for column in GERMAN_COLUMNS_SPEC:
            if column.name in numeric:
                lo, hi = numeric[column.name]
                row.append(str(int(rng.integers(lo, hi + 1))))
            else:
                row.append(str(rng.choice(column.codes)))  # type: ignore[union-attr]
        bad = row[0] in ("A11", "A12") and rng.random() < 0.6 or rng.random() < 0.1
        lines.append(" ".join([*row, "2" if bad else "1"]))
    path = root / "german.data"
    path.write_text("\n".join(lines) + "\n")
    return path


NEEDED = {
    "CreditDefaultDataModule": ["default_of_credit_card_clients.csv"],
    "AdultDataModule": ["adult.data", "adult.test"],
    "GermanCreditDataModule": ["german.data"],
}
WRITERS = {
    "CreditDefaultDataModule": write_credit,
    "AdultDataModule": write_adult,
    "GermanCreditDataModule": write_german,
}


def tabular_args(config: Path, tmp_path: Path) -> list[str]:
    """For a tabular config: the data root (the real files when present, else a fixture in the real format) and
    3-batch epochs; for a transfer config, a source checkpoint (a TabularMLP of the config's widths, saved as a state
    dict) in place of the one the source config writes."""
    loaded = yaml.safe_load(config.read_text())
    name = loaded["data"]["class_path"].rsplit(".", 1)[-1]
    if name not in REAL:
        return []
    root = REAL[name]
    if not all((root / f).is_file() for f in NEEDED[name]):
        root = tmp_path / "data"
        WRITERS[name](root)
    args = [f"--data.init_args.root={root}", "--trainer.limit_train_batches=3"]
    backbone = loaded["model"]["init_args"]["backbone"].get("init_args") or {}
    if backbone.get("init_from"):
        import dplit.data
        from dplit.data.tabular import feature_width
        from dplit.models import TabularMLP

        width = feature_width(getattr(dplit.data, name).columns)
        ckpt = tmp_path / "source.pt"
        torch.save(TabularMLP(width, 2, backbone.get("hidden")).state_dict(), ckpt)
        args.append(f"--model.init_args.backbone.init_args.init_from={ckpt}")
    return args
