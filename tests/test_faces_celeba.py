"""CelebA through torchvision on files in the released format: target and group attributes, official splits."""

from __future__ import annotations

import pytest
from vision_fixtures import write_celeba

from dplit.data.celeba import ATTRIBUTES, CelebADataModule


@pytest.fixture
def celeba_root(tmp_path, monkeypatch):
    from torchvision.datasets import CelebA

    monkeypatch.setattr(CelebA, "_check_integrity", lambda self: True)  # the fixture is not the official files
    return write_celeba(tmp_path)


def test_attributes_become_target_and_groups(celeba_root):
    dm = CelebADataModule(root=str(celeba_root), target="Smiling", groups=["Male", "Young"], resize=12, crop=8)
    assert dm.group_attributes == {"Male": ["not_Male", "Male"], "Young": ["not_Young", "Young"]}
    splits = dm.splits()
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 3, 3]  # the official partition
    lines = (celeba_root / "celeba" / "list_attr_celeba.txt").read_text().splitlines()[2:]
    rows = {line.split()[0]: [int(v) for v in line.split()[1:]] for line in lines}
    for split in splits.values():
        for path, y, group in zip(split.images, split.y, split.group, strict=True):
            row = rows[path.name]
            assert int(y) == (row[ATTRIBUTES.index("Smiling")] + 1) // 2
            assert group.tolist() == [(row[ATTRIBUTES.index(a)] + 1) // 2 for a in ("Male", "Young")]
            assert path.is_file()
    x, y, group = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 8, 8) and group.shape == (6, 2)
    one = CelebADataModule(root=str(celeba_root), groups=["Male"], resize=12, crop=8).splits()["test"]
    assert one.group.dim() == 1 and one.group_counts(2) == [3 - int(one.group.sum()), int(one.group.sum())]


def test_bad_attributes_and_missing_files():
    with pytest.raises(ValueError, match="CelebA attributes"):
        CelebADataModule(target="Smiling", groups=["Smiling"])
    with pytest.raises(ValueError, match="CelebA attributes"):
        CelebADataModule(groups=["Tall"])


def test_missing_data_says_where_to_get_celeba(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mmlab.ie.cuhk.edu.hk.*--data.root.*--data.download"):
        CelebADataModule(root=str(tmp_path)).setup()
