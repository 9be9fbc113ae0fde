"""UTKFace: file-name parsing, bad names reported, seeded splits, the training cut, groups and batches."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from vision_fixtures import UTK_AGES, UTK_BAD, write_utkface

from dplit.data.utkface import RACES, UTKFaceDataModule, parse_utkface_name, scan_utkface

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("26_1_2_20170116174525125.jpg.chip.jpg", (26, 1, 2)),  # official release
        ("26_1_2_20170116174525125.jpg", (26, 1, 2)),  # the shared copy
        ("24_0_1_20170116220224657 .jpg.chip.jpg", (24, 0, 1)),  # malformed official names that carry all labels
        ("55_0_0_20170116232725357jpg.chip.jpg", (55, 0, 0)),
        ("39_1_20170116174525125.jpg.chip.jpg", None),  # no race field
        ("30_2_1_20170116174525125.jpg", None),  # gender out of range
        ("30_0_5_20170116174525125.jpg", None),  # race out of range
        ("117_0_0_20170116174525125.jpg", None),  # age out of range
        ("a_0_0_20170116174525125.jpg", None),
        ("30_0_0_20170116174525125.png", None),
    ],
)
def test_parse_names(name, expected):
    assert parse_utkface_name(name) == expected


def test_bad_names_are_reported_with_count_and_examples(utkface_root, caplog):
    with caplog.at_level(logging.WARNING, logger="dplit.data.utkface"):
        index = scan_utkface(utkface_root)
    assert sorted(index.bad) == sorted(UTK_BAD)  # README.txt is not a JPEG: ignored, not reported
    assert len(index.files) == 5 * 2 * len(UTK_AGES) * 2
    assert "skipped 3 of 83 JPEG files" in caplog.text and UTK_BAD[0] in caplog.text


def test_official_names_and_archive_folder(tmp_path):
    write_utkface(tmp_path / "UTKFace", per_cell=1, official=True)
    index = scan_utkface(tmp_path)  # the archive's UTKFace/ folder is found under root
    assert len(index.files) == 40 and index.files[0].name.endswith(".jpg.chip.jpg")
    ages = sorted(set(index.labels[:, 0].tolist()))
    assert ages == sorted(UTK_AGES)


def test_missing_folder_says_where_to_get_it(tmp_path):
    dm = UTKFaceDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"susanqq.github.io/UTKFace.*--data.root"):
        dm.setup()
    with pytest.raises(FileNotFoundError, match="--data.root"):
        UTKFaceDataModule().setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no face named"):
        UTKFaceDataModule(root=str(tmp_path / "empty")).setup()


def _labels(dataset) -> list[tuple[str, int, tuple[int, ...]]]:
    return [(Path(f).name, int(y), tuple(g.tolist())) for f, y, g in zip(dataset.images, dataset.y, dataset.group)]


def test_gender_task_groups_splits_and_batches(utkface_root):
    dm = UTKFaceDataModule(root=str(utkface_root), task="gender", resize=12, crop=8, batch_size=16)
    assert dm.num_classes == 2 and dm.group_names == RACES
    assert list(dm.group_attributes) == ["race", "gender", "age"]
    assert dm.group_attributes["age"] == ["0-19", "20-39", "40-59", "60+"]
    splits = dm.splits()
    names = [set(Path(f).name for f in splits[s].images) for s in ("train", "val", "test")]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(len(n) for n in names) == 80 and len(names[2]) == 16 and len(names[1]) == 8
    for name, y, (race, gender, band) in _labels(splits["train"]):  # labels and groups read from the name
        age, g, r = (int(v) for v in name.split("_")[:3])
        assert (y, gender, race) == (g, g, r) and band == [0, 20, 40, 60].index(
            max(e for e in (0, 20, 40, 60) if e <= age)
        )
    x, y, group = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert group.shape == (16, 3) and torch.equal(group[:, 1], y)
    # the same split seed gives the same test faces whatever the training seed
    other = UTKFaceDataModule(root=str(utkface_root), seed=5, resize=12, crop=8)
    assert list(other.splits()["test"].images) == list(splits["test"].images)


def test_age_task_targets_are_bands(utkface_root):
    dm = UTKFaceDataModule(root=str(utkface_root), task="age", age_bands=[0, 30], resize=12, crop=8)
    assert dm.num_classes == 2 and dm.group_attributes["age"] == ["0-29", "30+"]
    train = dm.splits()["train"]
    ages = np.array([int(Path(f).name.split("_")[0]) for f in train.images])
    assert torch.equal(train.y, torch.from_numpy((ages >= 30).astype(np.int64)))
    assert torch.equal(train.group[:, 2], train.y)


def test_underrepresented_cut_is_exact_seeded_and_training_only(utkface_root):
    def make(seed: int) -> UTKFaceDataModule:
        return UTKFaceDataModule(root=str(utkface_root), underrepresented={"Black": 3}, seed=seed, resize=12, crop=8)

    full = UTKFaceDataModule(root=str(utkface_root), resize=12, crop=8)
    a, b, c = make(0), make(0), make(1)
    assert a.splits()["train"].group_counts(5)[1] == 3
    assert a.train_group_counts["race"] == [
        n if r != 1 else 3 for r, n in enumerate(full.splits()["train"].group_counts(5))
    ]
    assert list(a.splits()["train"].images) == list(b.splits()["train"].images)
    assert list(a.splits()["train"].images) != list(c.splits()["train"].images)
    assert list(a.splits()["test"].images) == list(full.splits()["test"].images)  # evaluation keeps every face
    with pytest.raises(ValueError, match="cannot keep 999"):
        UTKFaceDataModule(root=str(utkface_root), underrepresented={"Black": 999}).setup()
    with pytest.raises(ValueError, match="White"):
        UTKFaceDataModule(root=str(utkface_root), underrepresented={"Martian": 1})
    female = UTKFaceDataModule(root=str(utkface_root), underrepresented={"female": 2},
                               underrepresented_attribute="gender", resize=12, crop=8)  # fmt: skip
    assert female.splits()["train"].group_counts(2, attribute=1)[1] == 2


def test_bad_arguments_name_the_flag():
    with pytest.raises(ValueError, match="data.age_bands"):
        UTKFaceDataModule(age_bands=[10, 20])
    with pytest.raises(ValueError, match="data.crop"):
        UTKFaceDataModule(resize=32, crop=64)
    with pytest.raises(ValueError, match="data.task"):
        UTKFaceDataModule(task="smile")  # type: ignore[arg-type]


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared UTKFace copy is not at {SHARED}")
def test_real_utkface_folder_matches_its_readme():
    """Counts from ../shared/data/README.md (race x gender table), parsed from all 23,704 real file names."""
    index = scan_utkface(SHARED)
    assert len(index.files) == 23704 and index.bad == []
    counts = np.zeros((5, 2), dtype=int)
    np.add.at(counts, (index.labels[:, 2], index.labels[:, 1]), 1)
    assert counts.tolist() == [[5477, 4601], [2317, 2208], [1575, 1859], [2261, 1714], [760, 932]]
    dm = UTKFaceDataModule(root=str(SHARED), underrepresented={"Black": 500}, limit_eval=8, batch_size=4)
    assert dm.splits()["train"].group_counts(5)[1] == 500
    x, _, _ = next(iter(dm.val_dataloader()))
    assert x.shape == (8, 3, 64, 64)
