"""CIFAR-10/100: the canonical pickles (checked against torchvision's reader), ImageFolder JPEGs, download path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from vision_fixtures import write_cifar_pickles

from dplit.data.cifar import CIFAR10_CLASSES, CIFAR100_CLASSES, CIFARDataModule, list_image_folder, read_cifar_pickles

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_jpeg"


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_pickles_read_as_torchvision_reads_them(dataset, tmp_path, monkeypatch):
    from torchvision import datasets

    root = write_cifar_pickles(tmp_path, dataset, 3, 1)
    classes = 10 if dataset == "cifar10" else 100
    images, labels = read_cifar_pickles(root, dataset, "train")
    assert images.shape == (3 * classes, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(
        images[..., 0], np.broadcast_to(labels[:, None, None] * (250 // classes), (len(labels), 32, 32))
    )
    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)  # not the official checksums
    for split in ("train", "test"):
        reference = cls(str(root), train=split == "train", download=False)
        ours = read_cifar_pickles(root, dataset, split)
        assert np.array_equal(ours[0], reference.data) and ours[1].tolist() == list(reference.targets)
        assert reference.classes == (CIFAR10_CLASSES if dataset == "cifar10" else CIFAR100_CLASSES)


def test_pickled_cifar100_datamodule(cifar100_root):
    dm = CIFARDataModule(root=str(cifar100_root), dataset="cifar100", val_size=50, resize=16, crop=8, batch_size=10)
    assert dm.num_classes == 100 and dm.group_names == CIFAR100_CLASSES
    splits = dm.splits()
    assert dm.source == "pickle" and dm.dataset_label == "CIFAR-100"
    assert [len(splits[s]) for s in ("train", "val", "test")] == [150, 50, 100]
    x, y, group = next(iter(dm.train_dataloader()))
    assert x.shape == (10, 3, 8, 8) and torch.equal(group, y)


def test_imagefolder_jpegs_are_labelled_jpeg(cifar_jpeg_root):
    dm = CIFARDataModule(root=str(cifar_jpeg_root), val_size=10, underrepresented={"cat": 1}, resize=16, crop=16)
    splits = dm.splits()
    assert dm.source == "imagefolder" and dm.dataset_label == "CIFAR-10 (JPEG)"
    train, val = splits["train"], splits["val"]
    assert not set(train.images) & set(val.images) and len(splits["test"]) == 20
    assert train.group_counts(10)[3] == 1 and len(train) + len(val) == 60 - (6 - 1 - val.group_counts(10)[3])
    for path, y in zip(train.images, train.y):
        assert Path(path).parent.name == CIFAR10_CLASSES[int(y)]
    x, y, _ = splits["test"][0]
    assert x.shape == (3, 16, 16) and int(y) == 0


def test_imagefolder_with_other_class_folders_is_refused(tmp_path):
    (tmp_path / "train" / "dogs").mkdir(parents=True)
    with pytest.raises(ValueError, match="class folders"):
        list_image_folder(tmp_path / "train", CIFAR10_CLASSES)


def test_missing_data_names_both_options(tmp_path):
    for dm in (CIFARDataModule(root=str(tmp_path)), CIFARDataModule()):
        with pytest.raises(FileNotFoundError, match=r"--data.download true.*--data.root.*cifar-10-batches-py"):
            dm.setup()
    with pytest.raises(FileNotFoundError, match="lacks"):
        CIFARDataModule(root=str(tmp_path), format="pickle").setup()


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    """`download: true` asks torchvision for the official archive (here a stand-in that writes the pickles)."""
    from torchvision import datasets

    calls = []

    def fake(root, train, download):
        calls.append((root, train, download))
        write_cifar_pickles(Path(root), "cifar10", 2, 1)

    monkeypatch.setattr(datasets, "CIFAR10", fake)
    dm = CIFARDataModule(root=str(tmp_path), download=True, val_size=5)
    dm.prepare_data()
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    dm.prepare_data()  # present now: no second download
    assert len(calls) == 2 and dm.train_size == 15


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"CIFAR-10 (JPEG) is not at {SHARED}")
def test_real_cifar10_jpeg_folder():
    files, labels = list_image_folder(SHARED / "train", CIFAR10_CLASSES)
    assert len(files) == 50000 and np.bincount(labels).tolist() == [5000] * 10
