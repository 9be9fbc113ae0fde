"""Tabular readers and preprocessing on real-format fixtures: no test statistic leaks into preprocessing, splits are
stratified and deterministic, malformed rows and unknown groups give clear errors, the download path works offline."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
import torch
from tabular_fixtures import write_adult, write_credit, write_german

from dplit.data import AdultDataModule, CreditDefaultDataModule, GermanCreditDataModule
from dplit.data.tabular import TabularFormatError, feature_names

DOMAIN = {"domain_column": "education", "source_domain": ["graduate school", "university"]}


def _perturb_rows(path, rows: set[int], columns=("X1", "X5", "X12", "X18")) -> None:
    """Rewrites the credit CSV with extreme numeric values in data rows ``rows`` (0-based), labels untouched."""
    with path.open(newline="") as handle:
        table = list(csv.reader(handle))
    header = table[0]
    for r in rows:
        for c in columns:
            table[r + 1][header.index(c)] = str(float(table[r + 1][header.index(c)]) * 37 + 123457)
    with path.open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\r\n").writerows(table)


def _split_rows(dm) -> dict[str, set[int]]:
    """File rows in each split: the split assignment depends only on labels and groups, so it is recomputed here."""
    from dplit.data.tabular_datasets import CreditDefaultDataModule as C

    data, y, _ = dm.read(dm._root())
    ids = np.stack([dm.specs[g].assign(data) for g in dm.groups], axis=1)
    strata = y * len(dm.specs[dm.groups[0]].names) + ids[:, 0]
    rows = np.arange(len(y))
    if dm.domain != "all":
        dom = dm.specs[dm.domain_column]
        in_source = np.isin(dom.assign(data), [dom.names.index(n) for n in dm.source_domain])
        rows = rows[in_source == (dm.domain == "source")]
    assert isinstance(dm, C)
    train, val, test = dm._split(rows, strata, None)
    return {"train": set(train.tolist()), "val": set(val.tolist()), "test": set(test.tolist())}


@pytest.mark.parametrize("preprocessing", ["train", "spec", "source"])
def test_no_test_statistic_leaks_into_preprocessing(tmp_path, preprocessing):
    """Changing the numeric values of test (and validation) rows changes no training or validation feature; in
    ``train`` mode changing training rows does change them (the check can fail), in ``spec`` mode nothing fitted."""
    kwargs = {**DOMAIN, "domain": "target"} if preprocessing == "source" else {}
    path = write_credit(tmp_path / "a")
    dm = CreditDefaultDataModule(root=str(tmp_path / "a"), preprocessing=preprocessing, **kwargs)
    before = {k: v.x.clone() for k, v in dm.splits().items()}
    rows = _split_rows(dm)
    assert sum(len(r) for r in rows.values()) == len(before["train"]) + len(before["val"]) + len(before["test"])

    _perturb_rows(path, rows["test"] | rows["val"])
    after = {k: v.x for k, v in CreditDefaultDataModule(root=str(tmp_path / "a"), preprocessing=preprocessing,
                                                        **kwargs).splits().items()}  # fmt: skip
    assert torch.equal(before["train"], after["train"])
    assert not torch.equal(before["test"], after["test"])  # the perturbation did reach the test rows

    write_credit(tmp_path / "b")
    _perturb_rows(tmp_path / "b" / path.name, set(sorted(rows["train"])[:40]))
    changed = CreditDefaultDataModule(root=str(tmp_path / "b"), preprocessing=preprocessing, **kwargs).splits()
    untouched = [i for i, r in enumerate(sorted(rows["train"])) if i >= 40]
    moved = not torch.allclose(before["train"][untouched], changed["train"].x[untouched])
    # fitted on the training split: other rows' features move; spec (fixed ranges) and source (public rows) do not
    assert moved == (preprocessing == "train")


def test_source_statistics_come_from_source_training_rows_only(tmp_path):
    write_credit(tmp_path)
    target = CreditDefaultDataModule(root=str(tmp_path), preprocessing="source", domain="target", **DOMAIN)
    source = CreditDefaultDataModule(root=str(tmp_path), preprocessing="train", domain="source", **DOMAIN)
    # `source` scaling = the scaling a source-domain run fits on its own training split
    names = feature_names(CreditDefaultDataModule.columns)
    age = names.index("X5")
    assert abs(float(source.splits()["train"].x[:, age].mean())) < 1e-5  # standardised on these rows
    assert float(target.splits()["train"].x[:, age].std()) > 0.1


def test_splits_are_stratified_deterministic_and_disjoint(tmp_path):
    write_credit(tmp_path, n=600)
    a = _split_rows(CreditDefaultDataModule(root=str(tmp_path)))
    b = _split_rows(CreditDefaultDataModule(root=str(tmp_path)))
    c = _split_rows(CreditDefaultDataModule(root=str(tmp_path), split_seed=1))
    assert a == b and a != c
    assert not (a["train"] & a["test"]) and not (a["val"] & a["test"]) and not (a["train"] & a["val"])
    assert len(a["train"] | a["val"] | a["test"]) == 600
    dm = CreditDefaultDataModule(root=str(tmp_path))
    splits = dm.splits()
    assert len(splits["test"]) == pytest.approx(120, abs=6) and len(splits["val"]) == pytest.approx(60, abs=6)
    rates = {k: float(v.y.float().mean()) for k, v in splits.items()}
    assert max(rates.values()) - min(rates.values()) < 0.03, rates  # label rate kept in every split
    female = {k: float((v.group[:, 0] == 1).float().mean()) for k, v in splits.items()}
    assert max(female.values()) - min(female.values()) < 0.03, female  # primary group share kept too


def test_groups_follow_the_documented_codes(tmp_path):
    write_german(tmp_path)
    dm = GermanCreditDataModule(root=str(tmp_path), groups=["sex", "marital", "age"], age_bands=[30])
    data, y, _ = dm.read(tmp_path)
    train = dm.splits()["train"]
    assert dm.group_attributes == {
        "sex": ["male", "female"],
        "marital": ["single", "married/widowed", "divorced/separated", "female div/sep/married"],
        "age": ["<30", "30+"],
    }
    female = np.isin(data["A9"], ["A92", "A95"])
    all_groups = torch.cat([s.group for s in dm.splits().values()])
    assert int((all_groups[:, 0] == 1).sum()) == int(female.sum())
    assert int((all_groups[:, 2] == 0).sum()) == int((data["A13"] < 30).sum())
    assert float(y.mean()) == pytest.approx(float((data["class"] == 2).mean()))  # 1 = bad (class 2)
    assert train.x.shape[1] == dm.num_features == len(feature_names(dm.columns))


def test_adult_official_test_split_and_missing_values(tmp_path):
    write_adult(tmp_path, n_train=200, n_test=90)
    dm = AdultDataModule(root=str(tmp_path), groups=["race", "sex"])
    splits = dm.splits()
    assert len(splits["test"]) == 90 and len(splits["train"]) + len(splits["val"]) == 200
    data, _, _ = dm.read(tmp_path)
    names = feature_names(dm.columns)
    missing = data["workclass"][:200] == "?"
    assert missing.any()
    x_all = torch.cat([splits["train"].x, splits["val"].x])
    assert int(x_all[:, names.index("workclass=other")].sum()) == int(missing.sum())


@pytest.mark.parametrize(
    "module, groups, message",
    [
        (CreditDefaultDataModule, ["sex", "religion"], "unknown group attribute 'religion'.*available: sex, age"),
        (AdultDataModule, ["education", "marital", "zodiac"], "unknown group attribute 'zodiac'.*race"),
        (GermanCreditDataModule, ["education"], "unknown group attribute 'education'.*foreign_worker"),
    ],
)
def test_unknown_group_attribute_is_a_clear_error(module, groups, message):
    with pytest.raises(ValueError, match=message):
        module(root="anywhere", groups=groups)
    with pytest.raises(ValueError, match="source_domain.*'PhD'"):
        CreditDefaultDataModule(root="x", domain_column="education", source_domain=["PhD"], domain="target")


def test_malformed_rows_name_the_line(tmp_path):
    path = write_credit(tmp_path / "credit", n=20)
    lines = path.read_bytes().split(b"\r\n")
    lines[7] = lines[7].rsplit(b",", 2)[0]  # data row on line 8 loses two fields
    path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(TabularFormatError, match=r"default_of_credit_card_clients.csv, line 8: expected 25"):
        CreditDefaultDataModule(root=str(tmp_path / "credit")).splits()
    lines[7] = lines[8].replace(b",", b",abc,", 1).rsplit(b",", 1)[0]  # a word where X1 is due
    path.write_bytes(b"\r\n".join(lines))
    with pytest.raises(TabularFormatError, match=r"line 8: column X1 is 'abc', not a number"):
        CreditDefaultDataModule(root=str(tmp_path / "credit")).splits()

    root = write_adult(tmp_path / "adult", n_train=10, n_test=10)
    test = (root / "adult.test").read_text().splitlines()
    test[4] = test[4].replace("50K.", "50K?")
    (root / "adult.test").write_text("\n".join(test))
    with pytest.raises(TabularFormatError, match=r"adult.test, line 5: income must be"):
        AdultDataModule(root=str(root)).splits()

    german = write_german(tmp_path / "german", n=10)
    rows = german.read_text().splitlines()
    rows[2] += " A999"
    german.write_text("\n".join(rows))
    with pytest.raises(TabularFormatError, match=r"german.data, line 3: expected 21 space-separated fields, got 22"):
        GermanCreditDataModule(root=str(tmp_path / "german")).splits()


def test_missing_data_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"archive.ics.uci.edu/dataset/144.*data.init_args.root"):
        GermanCreditDataModule(root=str(tmp_path)).splits()
    with pytest.raises(FileNotFoundError, match=r"adult.data not found.*download: true"):
        AdultDataModule(root=str(tmp_path)).splits()


def test_download_path_with_a_patched_network(tmp_path, monkeypatch):
    """download: true fetches german.data from its UCI URL (served from a fixture, no network) and parses it."""
    import dplit.download

    payload = write_german(tmp_path / "fixture", n=80).read_bytes()
    asked: list[str] = []

    class Response(io.BytesIO):
        headers = {"Content-Length": str(len(payload))}

    def fake_open(url, timeout=60):
        asked.append(url)
        return Response(payload)

    monkeypatch.setattr(dplit.download, "open_url", fake_open)
    dm = GermanCreditDataModule(root=str(tmp_path / "fresh"), download=True)
    assert sum(len(s) for s in dm.splits().values()) == 80
    assert asked == ["https://archive.ics.uci.edu/ml/machine-learning-databases/statlog/german/german.data"]
    assert (tmp_path / "fresh" / "german.data").read_bytes() == payload


def test_training_split_statistics_warn_under_dp(tmp_path, caplog):
    """preprocessing: train fits on the private rows, which DP does not cover: warned when a DP callback is active."""
    from types import SimpleNamespace

    from dplit.callbacks import DifferentialPrivacy

    write_german(tmp_path, n=60)
    for preprocessing, callbacks, warned in [("train", [DifferentialPrivacy(noise_multiplier=1.0)], True),
                                             ("spec", [DifferentialPrivacy(noise_multiplier=1.0)], False),
                                             ("train", [], False)]:  # fmt: skip
        caplog.clear()
        dm = GermanCreditDataModule(root=str(tmp_path), preprocessing=preprocessing)
        dm.trainer = SimpleNamespace(callbacks=callbacks)
        with caplog.at_level("WARNING", logger="dplit.data.tabular_module"):
            dm.setup("fit")
        assert ("NOT covered by the DP guarantee" in caplog.text) == warned, (preprocessing, callbacks)
