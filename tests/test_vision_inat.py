"""iNaturalist through torchvision on folders in its real layouts (2019 super categories, 2021 ranks)."""

from __future__ import annotations

import pytest
from vision_fixtures import write_inaturalist

from dplit.data.inat import INaturalistDataModule, read_inaturalist


def test_2019_super_categories(tmp_path):
    root = write_inaturalist(tmp_path, "2019", per_category=4)
    files, labels, names = read_inaturalist(root, "2019", "super")
    assert names == ["Birds", "Plants"] and len(files) == 12
    assert all(names[y] == f.parts[-3] for f, y in zip(files, labels.tolist(), strict=True))
    full = read_inaturalist(root, "2019", "full")[1]
    assert all(int(f.parts[-2]) == y for f, y in zip(files, full.tolist(), strict=True))  # folder name = category id
    dm = INaturalistDataModule(root=str(root), resize=16, crop=12, val_fraction=0.25, test_fraction=0.25)
    assert dm.num_classes == 2 and dm.group_attributes == {"super": ["Birds", "Plants"]}
    splits = dm.splits()
    assert sum(len(s) for s in splits.values()) == 12 and len(splits["val"]) == 3
    x, y, group = splits["train"][0]
    assert x.shape == (3, 12, 12) and int(y) == int(group)


def test_2021_ranks_and_bad_input(tmp_path):
    root = write_inaturalist(tmp_path, "2021_train_mini")
    files, labels, names = read_inaturalist(root, "2021_train_mini", "kingdom")
    assert names == ["Animalia", "Plantae"]
    assert [names[y] for y in labels.tolist()] == [f.parts[-2].split("_")[1] for f in files]
    assert read_inaturalist(root, "2021_train_mini", "family")[2] == ["Corvidae", "Paridae", "Rosaceae"]
    with pytest.raises(ValueError, match="not available"):
        read_inaturalist(root, "2021_train_mini", "super")
    with pytest.raises(FileNotFoundError, match="inat_comp"):
        read_inaturalist(root, "2019", "super")
    (root / "2018" / "Birds" / "x").mkdir(parents=True)  # 2018/2019 folders must be category ids
    with pytest.raises(ValueError, match="non-numeric"):
        read_inaturalist(root, "2018", "super")
    with pytest.raises(FileNotFoundError, match="data.root"):
        INaturalistDataModule().splits()
