"""TwitterAAE: the Blodgett, Green & O'Connor (EMNLP 2016) demographic dialect model and the labelled tweets.

The model (https://github.com/slanglab/twitteraae, ``model/``) is a mixed-membership model with four topics,
African-American, Hispanic, Asian and White, in that order. It ships as two aligned files:

- ``model_count_table.txt``: one row per vocabulary word of 4 tab-separated expected word-topic counts;
- ``model_vocab.txt``: one ``<count>\\t<token>`` line per word, line ``i`` naming row ``i`` of the table.

:class:`DialectModel` reproduces the reference ``code/predict.py``: word probabilities
``(counts + 1) / counts.sum(axis=0)``, then CVB0 posterior inference over the in-vocabulary (lower-cased) tokens
with ``alpha = 1`` and ``num_passes = 5``.

The labelled tweets (``aae_happy``/``aae_sad`` and, where present, ``sae_happy``/``sae_sad``) hold one tweet per
``\\n``-terminated line; see :func:`read_labelled_tweets`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

__all__ = [
    "DIALECTS",
    "LABELLED_FILES",
    "MENTION_TOKEN",
    "MODEL_SOURCE",
    "SENTIMENT_SOURCE",
    "DialectModel",
    "read_labelled_tweets",
    "tokenize",
]

DIALECTS = ("AA", "Hispanic", "Asian", "White")
COUNT_TABLE = "model_count_table.txt"
VOCAB = "model_vocab.txt"
MODEL_SOURCE = "https://github.com/slanglab/twitteraae (folder model/)"
SENTIMENT_SOURCE = (
    "https://github.com/mohummedalee/twitteraae-sentiment-data (data/raw/sentiment_race/), "
    "built from http://slanglab.cs.umass.edu/TwitterAAE/"
)
LABELLED_FILES = ("aae_happy", "aae_sad", "sae_happy", "sae_sad")
REQUIRED_LABELLED_FILES = ("aae_happy", "aae_sad")
MENTION_TOKEN = "_TWITTER-ENTITY_"

_URL = re.compile(r"^(https?://|www\.)", re.IGNORECASE)


def tokenize(text: str) -> list[str]:
    """A minimal tweet tokenizer: lower-case, split on whitespace, ``@user`` -> :data:`MENTION_TOKEN`, URLs dropped.

    This is not the reference ``twokenize``; it is enough for already space-tokenised text such as the
    TwitterAAE sentiment files.
    """
    tokens = []
    for tok in text.split():
        if _URL.match(tok):
            continue
        tokens.append(MENTION_TOKEN if tok.startswith("@") and len(tok) > 1 else tok.lower())
    return tokens


class DialectModel:
    """Posterior dialect proportions of the TwitterAAE demographic mixture model.

    Args:
        counts: ``(V, 4)`` expected word-topic counts (AA, Hispanic, Asian, White).
        vocab: the ``V`` tokens, aligned with the rows of ``counts``.
    """

    def __init__(self, counts: np.ndarray, vocab: list[str]) -> None:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 2 or counts.shape[1] != len(DIALECTS):
            raise ValueError(f"counts must have shape (V, {len(DIALECTS)}), got {counts.shape}")
        if counts.shape[0] != len(vocab):
            raise ValueError(f"{counts.shape[0]} count rows but {len(vocab)} vocabulary entries")
        self.counts = counts
        self.vocab = list(vocab)
        # As the reference: +1 smoothing on the counts, normalised by the unsmoothed topic totals.
        self.word_probs = (counts + 1.0) / counts.sum(axis=0)  # (V, 4)
        # A dict comprehension, like the reference: a repeated token maps to its last row.
        self.index = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def load(cls, model_dir: str | Path) -> DialectModel:
        """Loads ``model_count_table.txt`` and ``model_vocab.txt`` from ``model_dir``.

        Raises:
            FileNotFoundError: when either file is missing.
            ValueError: when the files are malformed or not aligned.
        """
        model_dir = Path(model_dir)
        table_path, vocab_path = model_dir / COUNT_TABLE, model_dir / VOCAB
        missing = [str(p) for p in (table_path, vocab_path) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"TwitterAAE model file(s) not found: {', '.join(missing)}. The model needs both {COUNT_TABLE} "
                f"and {VOCAB}; get them from {MODEL_SOURCE}."
            )
        text = table_path.read_text(encoding="ascii")
        n_rows = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
        # Much faster than np.loadtxt on 191k lines.
        values = np.array(text.split(), dtype=np.float64)
        if values.size != n_rows * len(DIALECTS):
            raise ValueError(f"{table_path}: expected {len(DIALECTS)} numbers on each of {n_rows} lines")
        counts = values.reshape(n_rows, len(DIALECTS))
        lines = vocab_path.read_bytes().split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        # Reference: the last tab field, ASCII-whitespace-stripped (Python 2 bytes.strip), then UTF-8 decoded.
        vocab = [line.split(b"\t")[-1].strip().decode("utf-8") for line in lines]
        return cls(counts, vocab)

    def infer(self, tokens: list[str], alpha: float = 1.0, num_passes: int = 5) -> np.ndarray:
        """CVB0 posterior topic proportions for in-vocabulary tokens, as the reference ``infer_cvb0``.

        Responsibilities start at the normalised word likelihoods (that initialisation counts as the first
        pass); each of the remaining ``num_passes - 1`` passes sets, token by token,
        ``q_i ∝ p(w_i | k) * (Q_k^{-i} + alpha)``. The result is the normalised expected topic counts
        ``Q_k / sum(Q)``; like the reference, alpha is not added to the returned proportions.

        Args:
            tokens: tokens that are all in the vocabulary (exact match).
            alpha: symmetric Dirichlet prior on the topic proportions.
            num_passes: passes including the initialisation.

        Returns:
            ``(4,)`` proportions summing to 1.
        """
        lik = self.word_probs[[self.index[w] for w in tokens]]  # (n, 4)
        qs = lik / lik.sum(axis=1, keepdims=True)  # (n, 4)
        lik = qs.copy()
        q_k = qs.sum(axis=0)  # (4,)
        for _ in range(1, num_passes):
            for i in range(len(tokens)):
                q_k -= qs[i]
                q = lik[i] * (q_k + alpha)
                qs[i] = q / q.sum()
                q_k += qs[i]
        return q_k / q_k.sum()

    def predict(
        self,
        tokens: list[str],
        alpha: float = 1.0,
        num_passes: int = 5,
        min_tokens: int = 1,
        min_fraction: float = 0.2,
    ) -> np.ndarray | None:
        """Dialect proportions (AA, Hispanic, Asian, White) of a tokenised tweet, or None.

        Tokens are lower-cased and looked up; out-of-vocabulary tokens are ignored. As the reference ``predict``,
        returns None when fewer than ``min_tokens`` tokens, or less than ``min_fraction`` of them, are in the
        vocabulary (set ``min_fraction=0`` to require only ``min_tokens``).
        """
        invocab = [t.lower() for t in tokens if t.lower() in self.index]
        if len(invocab) < max(min_tokens, 1) or len(invocab) < min_fraction * len(tokens):
            return None
        return self.infer(invocab, alpha=alpha, num_passes=num_passes)


def read_labelled_tweets(root: str | Path) -> dict[str, list[str]]:
    """Reads the sentiment-labelled tweet files, one tweet per ``\\n``-terminated line.

    Splits on ``b"\\n"`` only, so a stray ``\\r`` inside a tweet stays in it, and decodes with
    ``errors="replace"`` (some lines of the real files are invalid UTF-8).

    Args:
        root: folder holding ``aae_happy`` and ``aae_sad`` and, when present, ``sae_happy`` and ``sae_sad``.

    Returns:
        File name -> tweets, for each file present.

    Raises:
        FileNotFoundError: when ``root`` or a required AAE file is missing.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"TwitterAAE sentiment folder not found: {root}. Get the files from {SENTIMENT_SOURCE}."
        )
    missing = [str(root / n) for n in REQUIRED_LABELLED_FILES if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"TwitterAAE sentiment file(s) not found: {', '.join(missing)}. Get them from {SENTIMENT_SOURCE}."
        )
    out: dict[str, list[str]] = {}
    for name in LABELLED_FILES:
        path = root / name
        if not path.is_file():
            continue
        pieces = path.read_bytes().split(b"\n")
        if pieces and pieces[-1] == b"":
            pieces.pop()
        out[name] = [p.decode("utf-8", errors="replace") for p in pieces]
    return out
