"""The three tabular datasets: column specs from their documentation, group attributes and targets.

- :class:`CreditDefaultDataModule`: default of credit card clients (Taiwan 2005); target ``default payment next
  month`` (1 = default); groups ``sex``, ``age``, ``education``, ``marital``.
- :class:`AdultDataModule`: UCI Adult; target income ``>50K`` (1); official test file as test split; groups
  ``sex``, ``race``, ``age``, ``education``, ``marital``.
- :class:`GermanCreditDataModule`: Statlog German credit; target class 2 = *bad* credit risk (1); groups ``sex``,
  ``age``, ``marital`` (both from attribute 9, personal status and sex), ``foreign_worker``.

Fixed numeric ranges (used by ``preprocessing: spec``) are the documented ranges where the documentation gives one,
otherwise round bounds chosen without looking at the data (money amounts on a signed log scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dplit.data.tabular import Categorical, Column, GroupSpec, Numeric, age_band_ids, age_band_names, code_groups
from dplit.data.tabular_io import (
    ADULT_URL,
    CREDIT_FILE,
    CREDIT_URL,
    GERMAN_FILE,
    GERMAN_URL,
    download_adult,
    download_credit,
    download_german,
    missing_message,
    read_adult,
    read_credit_csv,
    read_german,
)
from dplit.data.tabular_module import TabularDataModule


def _age(column: str, edges: Sequence[int]) -> GroupSpec:
    return GroupSpec("age", age_band_names(edges), lambda d: age_band_ids(d[column], edges))


# ---------------------------------------------------------------- Taiwan credit default
_PAY = tuple(Numeric(f"X{i}", -2, 8) for i in range(6, 12))  # PAY_0, PAY_2..PAY_6: -2..8 (documented)
_BILL = tuple(Numeric(f"X{i}", -1e6, 1e6, log=True) for i in range(12, 18))  # BILL_AMT1-6 (NT$)
_PAID = tuple(Numeric(f"X{i}", 0, 1e6, log=True) for i in range(18, 24))  # PAY_AMT1-6 (NT$)
CREDIT_COLUMNS_SPEC: tuple[Column, ...] = (
    Numeric("X1", 0, 1e6, log=True),  # LIMIT_BAL
    Categorical("X2", ("1", "2")),  # SEX: 1 male, 2 female
    Categorical("X3", ("1", "2", "3", "4")),  # EDUCATION: graduate school, university, high school, others
    Categorical("X4", ("1", "2", "3")),  # MARRIAGE: married, single, others
    Numeric("X5", 18, 80),  # AGE
    *_PAY,
    *_BILL,
    *_PAID,
)


class CreditDefaultDataModule(TabularDataModule):
    """Default of credit card clients (Yeh & Lien 2009), ``root/default_of_credit_card_clients.csv``.

    Target: ``Y`` (default payment next month, 1 = yes). Groups: ``sex`` (male, female), ``age`` (bands),
    ``education`` (graduate school, university, high school, other = the codes 4, 0, 5, 6), ``marital``
    (married, single, other = codes 3 and 0). See :class:`~dplit.data.tabular_module.TabularDataModule` for the
    arguments.
    """

    columns = CREDIT_COLUMNS_SPEC
    dataset_name = "credit"

    def group_specs(self, age_bands: Sequence[int]) -> dict[str, GroupSpec]:
        return {
            "sex": GroupSpec("sex", ("male", "female"), code_groups("X2", {"1": 0, "2": 1})),
            "age": _age("X5", age_bands),
            "education": GroupSpec(
                "education",
                ("graduate school", "university", "high school", "other"),
                code_groups("X3", {"1": 0, "2": 1, "3": 2}),
            ),
            "marital": GroupSpec("marital", ("married", "single", "other"), code_groups("X4", {"1": 0, "2": 1})),
        }

    def required_files(self) -> list[str]:
        return [CREDIT_FILE]

    def missing_message(self, path: Path) -> str:
        return missing_message(path, CREDIT_URL, "https://archive.ics.uci.edu/dataset/350")

    def fetch(self, root: Path) -> None:
        download_credit(root)

    def read(self, root: Path) -> tuple[dict[str, np.ndarray], np.ndarray, None]:
        data = read_credit_csv(root / CREDIT_FILE)
        return data, data["Y"].astype(np.int64), None


# ---------------------------------------------------------------- UCI Adult (codes as listed in adult.names)
ADULT_CODES = {
    "workclass": "Private, Self-emp-not-inc, Self-emp-inc, Federal-gov, Local-gov, State-gov, Without-pay, "
    "Never-worked",
    "education": "Bachelors, Some-college, 11th, HS-grad, Prof-school, Assoc-acdm, Assoc-voc, 9th, 7th-8th, 12th, "
    "Masters, 1st-4th, 10th, Doctorate, 5th-6th, Preschool",
    "marital-status": "Married-civ-spouse, Divorced, Never-married, Separated, Widowed, Married-spouse-absent, "
    "Married-AF-spouse",
    "occupation": "Tech-support, Craft-repair, Other-service, Sales, Exec-managerial, Prof-specialty, "
    "Handlers-cleaners, Machine-op-inspct, Adm-clerical, Farming-fishing, Transport-moving, Priv-house-serv, "
    "Protective-serv, Armed-Forces",
    "relationship": "Wife, Own-child, Husband, Not-in-family, Other-relative, Unmarried",
    "race": "White, Asian-Pac-Islander, Amer-Indian-Eskimo, Other, Black",
    "sex": "Female, Male",
    "native-country": "United-States, Cambodia, England, Puerto-Rico, Canada, Germany, Outlying-US(Guam-USVI-etc), "
    "India, Japan, Greece, South, China, Cuba, Iran, Honduras, Philippines, Italy, Poland, Jamaica, Vietnam, Mexico, "
    "Portugal, Ireland, France, Dominican-Republic, Laos, Ecuador, Taiwan, Haiti, Columbia, Hungary, Guatemala, "
    "Nicaragua, Scotland, Thailand, Yugoslavia, El-Salvador, Trinadad&Tobago, Peru, Hong, Holand-Netherlands",
}


def _codes(name: str) -> Categorical:
    return Categorical(name, tuple(code.strip() for code in ADULT_CODES[name].split(",")))


ADULT_COLUMNS_SPEC: tuple[Column, ...] = (
    Numeric("age", 17, 90),
    _codes("workclass"),
    Numeric("fnlwgt", 1e4, 1.5e6, log=True),
    _codes("education"),
    Numeric("education-num", 1, 16),
    _codes("marital-status"),
    _codes("occupation"),
    _codes("relationship"),
    _codes("race"),
    _codes("sex"),
    Numeric("capital-gain", 0, 1e5, log=True),
    Numeric("capital-loss", 0, 5000, log=True),
    Numeric("hours-per-week", 1, 99),
    _codes("native-country"),
)


def _education_level(data: dict[str, np.ndarray]) -> np.ndarray:
    """education-num: 1-8 below high school, 9 HS-grad, 10-12 some college/associate, 13 Bachelors, 14-16 advanced."""
    return np.searchsorted(np.array([9, 10, 13, 14]), data["education-num"], side="right").astype(np.int64)


class AdultDataModule(TabularDataModule):
    """UCI Adult (census income 1994), ``root/adult.data`` and ``root/adult.test`` (the official test split).

    Target: income ``>50K`` (1). Groups: ``sex`` (male, female), ``race`` (the five documented values), ``age``
    (bands), ``education`` (levels from education-num), ``marital`` (married, never married, previously married).
    ``test_fraction`` is ignored: the test split is ``adult.test``.
    """

    columns = ADULT_COLUMNS_SPEC
    dataset_name = "adult"

    def group_specs(self, age_bands: Sequence[int]) -> dict[str, GroupSpec]:
        married = {"Married-civ-spouse": 0, "Married-AF-spouse": 0, "Married-spouse-absent": 0, "Never-married": 1}
        races = ("White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other")
        return {
            "sex": GroupSpec("sex", ("male", "female"), code_groups("sex", {"Male": 0, "Female": 1})),
            "race": GroupSpec("race", races, code_groups("race", {r: i for i, r in enumerate(races)})),
            "age": _age("age", age_bands),
            "education": GroupSpec(
                "education", ("below HS", "HS-grad", "some college", "bachelors", "advanced"), _education_level
            ),
            "marital": GroupSpec(
                "marital", ("married", "never married", "previously married"), code_groups("marital-status", married)
            ),
        }

    def required_files(self) -> list[str]:
        return ["adult.data", "adult.test"]

    def missing_message(self, path: Path) -> str:
        return missing_message(path, f"{ADULT_URL}/{path.name}", "https://archive.ics.uci.edu/dataset/2/adult")

    def fetch(self, root: Path) -> None:
        download_adult(root)

    def read(self, root: Path) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        train, test = read_adult(root / "adult.data"), read_adult(root / "adult.test")
        data = {k: np.concatenate([train[k], test[k]]) for k in train}
        is_test = np.arange(len(data["income"])) >= len(train["income"])
        return data, (data["income"] == ">50K").astype(np.int64), is_test


# ---------------------------------------------------------------- Statlog German credit (codes from german.doc)
def _coded(index: int, count: int, first: int = 1) -> Categorical:
    return Categorical(f"A{index}", tuple(f"A{index}{k}" for k in range(first, first + count)))


GERMAN_COLUMNS_SPEC: tuple[Column, ...] = (
    _coded(1, 4),  # status of existing checking account A11-A14
    Numeric("A2", 4, 72),  # duration in months
    _coded(3, 5, first=0),  # credit history A30-A34
    Categorical("A4", tuple(f"A4{k}" for k in range(11))),  # purpose A40-A410 (A47 listed but absent)
    Numeric("A5", 0, 20000, log=True),  # credit amount (DM)
    _coded(6, 5),  # savings A61-A65
    _coded(7, 5),  # present employment since A71-A75
    Numeric("A8", 1, 4),  # installment rate in % of disposable income
    _coded(9, 5),  # personal status and sex A91-A95
    _coded(10, 3),  # other debtors / guarantors A101-A103
    Numeric("A11", 1, 4),  # present residence since
    _coded(12, 4),  # property A121-A124
    Numeric("A13", 18, 75),  # age in years
    _coded(14, 3),  # other installment plans A141-A143
    _coded(15, 3),  # housing A151-A153
    Numeric("A16", 1, 4),  # number of existing credits at this bank
    _coded(17, 4),  # job A171-A174
    Numeric("A18", 1, 2),  # number of people liable to provide maintenance for
    _coded(19, 2),  # telephone A191-A192
    _coded(20, 2),  # foreign worker A201 yes, A202 no
)


class GermanCreditDataModule(TabularDataModule):
    """Statlog German credit (Hofmann 1994), ``root/german.data``.

    Target: class 2 = *bad* credit risk (1), class 1 = good (0). Groups from attribute 9 (personal status and
    sex): ``sex`` (female = A92, A95), ``marital`` (single = A93, A95; married/widowed = A94; divorced/separated =
    A91; A92 "female: divorced/separated/married" is its own group), and ``age`` (attribute 13), ``foreign_worker``.
    """

    columns = GERMAN_COLUMNS_SPEC
    dataset_name = "german"

    def group_specs(self, age_bands: Sequence[int]) -> dict[str, GroupSpec]:
        sex = {"A91": 0, "A93": 0, "A94": 0, "A92": 1, "A95": 1}
        marital = {"A93": 0, "A95": 0, "A94": 1, "A91": 2, "A92": 3}
        return {
            "sex": GroupSpec("sex", ("male", "female"), code_groups("A9", sex)),
            "age": _age("A13", age_bands),
            "marital": GroupSpec(
                "marital",
                ("single", "married/widowed", "divorced/separated", "female div/sep/married"),
                code_groups("A9", marital),
            ),
            "foreign_worker": GroupSpec("foreign_worker", ("yes", "no"), code_groups("A20", {"A201": 0, "A202": 1})),
        }

    def required_files(self) -> list[str]:
        return [GERMAN_FILE]

    def missing_message(self, path: Path) -> str:
        return missing_message(path, GERMAN_URL, "https://archive.ics.uci.edu/dataset/144")

    def fetch(self, root: Path) -> None:
        download_german(root)

    def read(self, root: Path) -> tuple[dict[str, np.ndarray], np.ndarray, None]:
        data = read_german(root / GERMAN_FILE)
        return data, (data["class"] == 2).astype(np.int64), None


__all__ = ["AdultDataModule", "CreditDefaultDataModule", "GermanCreditDataModule"]
