"""Word-level encoding by stable hashing, so the DataModule and the embedding need no shared vocabulary object.

A tweet becomes a row of int64 word hashes (0 = padding). The embedding (:class:`dplit.models.HashedWordEmbedding`)
maps hashes to rows of a *public* vocabulary (the GloVe word list) and hashes every other word into a fixed number
of trainable OOV buckets. No vocabulary is built from the private training tweets: a data-derived vocabulary would
reveal which rare words occur in the training set, outside the DP guarantee.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch

PAD_HASH = 0
_MASK = (1 << 63) - 1


def word_hash(word: str) -> int:
    """Stable positive 63-bit hash of ``word`` (BLAKE2b, identical across processes and machines); never 0."""
    h = int.from_bytes(hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
    return (h & _MASK) or 1


def encode_words(
    texts: Iterable[str], max_len: int, tokenize: Callable[[str], list[str]] | None = None
) -> torch.Tensor:
    """Token hashes ``[N, max_len]`` (int64), truncated to the first ``max_len`` tokens and right-padded with 0.

    Args:
        texts: the documents.
        max_len: sequence length.
        tokenize: text -> tokens; defaults to :func:`dplit.data.twitteraae.tokenize` (lower-cased, mentions
            replaced, URLs dropped).
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if tokenize is None:
        from dplit.data.twitteraae import tokenize as tweet_tokenize

        tokenize = tweet_tokenize
    rows = [[word_hash(t) for t in tokenize(text)[:max_len]] for text in texts]
    out = torch.zeros(len(rows), max_len, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return out


__all__ = ["PAD_HASH", "encode_words", "word_hash"]
