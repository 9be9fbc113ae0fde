"""Word embedding over hashed tokens: a public GloVe vocabulary plus trainable OOV hash buckets."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from dplit.text.words import PAD_HASH, word_hash


class HashedWordEmbedding(nn.Module):
    """Maps int64 word hashes (:func:`dplit.text.words.encode_words`, 0 = padding) to vectors ``[..., D]``.

    The vocabulary is the first ``max_words`` words of a GloVe source: public data, never the training set. A
    vocabulary built from the private training tweets would itself reveal which (rare) words occur in them, and it
    would be released with the model outside the DP guarantee. Words outside it share ``oov_buckets`` trainable rows
    by ``hash % oov_buckets``.

    Rows of ``self.embedding`` (a plain ``nn.Embedding``, so Opacus computes its per-sample gradients): 0 is
    padding (zeros), ``1..K`` the K GloVe words in file order, ``K+1..K+oov_buckets`` the OOV buckets, drawn from
    ``N(0, std of the GloVe vectors)`` (``N(0, 1)`` without a source) with a generator seeded by ``seed``.

    Padded positions are also masked in ``forward``: Opacus's ``nn.Embedding`` grad sampler ignores
    ``padding_idx`` and the DP optimizer adds noise to every row, so row 0 alone would not keep padding at zero.

    Args:
        source: GloVe source for :func:`dplit.text.glove.load_glove` (``"kumo"``, ``"glove.6B.300d"``, a path);
            ``None`` for no pretrained words (every word goes to an OOV bucket; ``dim`` is then required).
        max_words: Vocabulary size K (the most frequent GloVe words); ``None`` keeps the whole file.
        oov_buckets: Number of OOV rows; 0 maps unknown words to the padding row (zero vector, no gradient).
        dim: Embedding size; must match the source's when both are given.
        freeze: Do not train the embedding (GloVe rows and OOV buckets).
        root: Folder of named GloVe sources.
        download: Fetch a named GloVe source into ``root`` when it is missing.
        seed: Seed of the OOV bucket initialisation.
    """

    def __init__(
        self,
        source: str | None = "kumo",
        max_words: int | None = 20000,
        oov_buckets: int = 5000,
        dim: int | None = None,
        freeze: bool = False,
        root: str | None = None,
        download: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if oov_buckets < 0:
            raise ValueError(f"oov_buckets must be >= 0, got {oov_buckets}")
        if source is None:
            if dim is None or dim < 1:
                raise ValueError("HashedWordEmbedding(source=None) needs dim >= 1 (there are no GloVe vectors)")
            if oov_buckets < 1:
                raise ValueError("HashedWordEmbedding(source=None) needs oov_buckets >= 1 (every word is OOV)")
            words: list[str] = []
            vectors = torch.empty(0, dim)
        else:
            from dplit.text.glove import load_glove

            words, vectors = load_glove(source, max_words=max_words, root=root, download=download)
            if dim is not None and dim != vectors.shape[1]:
                raise ValueError(f"dim={dim} but embedding source {source!r} has {vectors.shape[1]}-d vectors")
        num_words, width = len(words), vectors.shape[1]

        # Hash -> row table, sorted by hash. On a collision (or a duplicate word) the first, more frequent word
        # keeps the hash; np.unique returns the first index of each value.
        hashes = np.array([word_hash(w) for w in words], dtype=np.int64)
        sorted_hashes, first = np.unique(hashes, return_index=True)
        self.num_collisions = num_words - len(sorted_hashes)
        self.register_buffer("vocab_hashes", torch.from_numpy(sorted_hashes.astype(np.int64)))
        self.register_buffer("vocab_rows", torch.from_numpy(first.astype(np.int64) + 1))
        self.vocab_hashes: Tensor
        self.vocab_rows: Tensor
        self.oov_buckets = oov_buckets

        std = vectors.std().item() if vectors.numel() > 1 else 1.0
        generator = torch.Generator().manual_seed(seed)
        weight = torch.cat(
            [
                torch.zeros(1, width),
                vectors.float(),
                torch.randn(oov_buckets, width, generator=generator) * std,
            ]
        )  # [1 + K + oov_buckets, D]
        self.embedding = nn.Embedding.from_pretrained(weight, freeze=freeze, padding_idx=0)
        self._num_words = num_words

    @property
    def num_words(self) -> int:
        """K, the number of GloVe rows (rows ``1..K``)."""
        return self._num_words

    @property
    def dim(self) -> int:
        """The embedding size D."""
        return self.embedding.embedding_dim

    @torch.no_grad()
    def _in_vocab(self, hashes: Tensor) -> tuple[Tensor, Tensor]:
        """(found, row) for each hash: whether it is a vocabulary word, and its row where it is."""
        if self.vocab_hashes.numel() == 0:
            return torch.zeros_like(hashes, dtype=torch.bool), torch.zeros_like(hashes)
        pos = torch.searchsorted(self.vocab_hashes, hashes).clamp_(max=self.vocab_hashes.numel() - 1)
        return self.vocab_hashes[pos] == hashes, self.vocab_rows[pos]

    @torch.no_grad()
    def lookup(self, hashes: Tensor) -> Tensor:
        """Row ids (int64, same shape) of word hashes: 0 for padding, 1..K vocabulary, K+1.. OOV buckets."""
        hashes = hashes.to(device=self.vocab_hashes.device, dtype=torch.int64)
        found, rows = self._in_vocab(hashes)
        if self.oov_buckets:
            oov = 1 + self._num_words + torch.remainder(hashes, self.oov_buckets)
        else:
            oov = torch.zeros_like(hashes)
        ids = torch.where(found, rows, oov)
        return ids.masked_fill_(hashes == PAD_HASH, 0)

    def forward(self, hashes: Tensor) -> Tensor:
        """Word hashes ``[...]`` (int64) -> vectors ``[..., D]``; padding positions are exactly zero."""
        ids = self.lookup(hashes)
        mask = (ids != 0).unsqueeze(-1)  # [..., 1]; also zeroes OOV words when oov_buckets == 0
        return self.embedding(ids) * mask.to(self.embedding.weight.dtype)

    @torch.no_grad()
    def oov_rate(self, hashes: Tensor) -> float:
        """Fraction of non-padding tokens outside the vocabulary (in OOV buckets); 0.0 when there are none."""
        hashes = hashes.to(device=self.vocab_hashes.device, dtype=torch.int64)
        real = hashes != PAD_HASH
        total = int(real.sum())
        if total == 0:
            return 0.0
        found, _ = self._in_vocab(hashes)
        return float((real & ~found).sum()) / total

    def extra_repr(self) -> str:
        return f"num_words={self._num_words}, oov_buckets={self.oov_buckets}, collisions={self.num_collisions}"
