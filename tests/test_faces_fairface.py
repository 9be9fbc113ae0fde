"""FairFace: the release's label CSVs and image folders, bad rows reported, groups and the race cut."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from vision_fixtures import write_fairface

from dplit.data.fairface import AGES, GENDERS, RACES, FairFaceDataModule, read_fairface_labels


def test_label_files_parse_and_bad_rows_are_reported(tmp_path, caplog):
    root = write_fairface(tmp_path)
    with caplog.at_level(logging.WARNING, logger="dplit.data.fairface"):
        files, labels, bad = read_fairface_labels(root, "train")
    assert len(files) == 4 * 7 and len(bad) == 1 and "Martian" in bad[0]
    assert "skipped 1 of 29 rows" in caplog.text
    rows = (root / "fairface_label_train.csv").read_text().splitlines()[1:]
    for path, (race, gender, age), row in zip(files, labels.tolist(), rows, strict=False):
        file, a, g, r, _ = row.split(",")
        assert path == root / file and (RACES[race], GENDERS[gender], AGES[age]) == (r, g, a)


def test_datamodule_targets_groups_and_cut(tmp_path):
    root = write_fairface(tmp_path, per_race=6)
    dm = FairFaceDataModule(root=str(root), task="race", val_fraction=0.2, underrepresented={"Black": 1},
                            resize=12, crop=8, batch_size=8)  # fmt: skip
    assert dm.num_classes == 7 and dm.group_names == RACES and dm.group_attributes["age"] == AGES
    splits = dm.splits()
    train = splits["train"]
    assert train.group_counts(7)[1] == 1 and len(splits["test"]) == 7
    assert torch.equal(train.y, train.group[:, 0])
    assert not set(train.images) & set(splits["val"].images)
    x, y, group = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, 8, 8) and group.shape[1] == 3
    gender = FairFaceDataModule(root=str(root), task="gender", resize=12, crop=8).splits()["test"]
    assert torch.equal(gender.y, gender.group[:, 1]) and FairFaceDataModule(task="gender").num_classes == 2


def test_missing_files_say_where_to_get_fairface(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"github.com/joojs/fairface.*--data.root"):
        FairFaceDataModule(root=str(tmp_path)).setup()
    root = write_fairface(tmp_path / "ff")
    for jpg in (root / "train").glob("*.jpg"):
        jpg.unlink()
    with pytest.raises(FileNotFoundError, match="which is missing"):
        FairFaceDataModule(root=str(root)).setup()
    (Path(root) / "fairface_label_val.csv").write_text("name,label\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        read_fairface_labels(root, "val")
