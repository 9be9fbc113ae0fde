"""LEAF Reddit as a federated next-word task: a word vocabulary and each user's (context, next word) samples.

LEAF's Reddit JSON (``data/reddit`` of https://github.com/TalwalkarLab/leaf) holds per user ``x``: a list of
comments, each a list of token lists (chunks of ``<PAD>``-padded tokens, ``<BOS>``/``<EOS>`` included), and ``y``: a
list of dicts per comment whose ``target_tokens`` are the same tokens shifted by one. The targets are therefore the
comment's own tokens: dplit reads each comment's token sequence from ``x`` (``<PAD>`` dropped,
:func:`dplit.federated.leaf.reddit_tokens`) and builds every next-word sample of it (``max_len`` words of left
context, left-padded, -> the next word), which is LEAF's sequence loss position by position.

Vocabulary (ids: 0 = padding, 1 = out-of-vocabulary, 2.. = words):

* ``data.vocab_file`` (preferred): a fixed public word list, one word per line, the first ``vocab_size`` lines
  used. It releases nothing about the users.
* none: the ``vocab_size`` most frequent words of the users' **training** comments (ties by word). The list is a
  function of private text and is itself a release that user-level DP-FedAvg does not cover (LEAF's
  ``reddit_vocab.pck`` is built the same way); it is refused when ``privacy`` is set (``config.validate``).

Samples whose target word is out of vocabulary are dropped from training and evaluation: accuracy is in-vocabulary
next-word accuracy (LEAF counts such positions as always wrong, i.e. scales accuracy down by their share).
A user's last ``eval_fraction`` of comments (at least one) are held out, so no held-out context overlaps training.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from dplit.federated.config import DataConfig, FederatedConfigError
from dplit.federated.leaf import read_leaf, reddit_tokens

PAD_ID, UNK_ID = 0, 1
SPECIAL = frozenset({"<BOS>", "<EOS>", "<PAD>"})
"""Markers LEAF adds; they are predicted and fed like words but not counted in a user's vocabulary size."""


def read_vocab_file(path: str | Path, size: int) -> list[str]:
    """The first ``size`` distinct words of a one-word-per-line file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FederatedConfigError(f"data.vocab_file {file} not found: give a word list, one word per line")
    words = list(dict.fromkeys(w.strip() for w in file.read_text().splitlines() if w.strip()))
    if not words:
        raise FederatedConfigError(f"data.vocab_file {file} has no words (one word per line)")
    return words[:size]


def build_vocab(train_comments: list[list[str]], size: int) -> list[str]:
    """The ``size`` most frequent tokens of the training comments (ties broken by the word)."""
    counts = Counter(t for comment in train_comments for t in comment)
    return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def next_word_samples(comments: list[list[str]], index: dict[str, int], max_len: int, stride: int) -> tuple[
    Tensor, Tensor
]:  # fmt: skip
    """``x`` [n, max_len] word ids (left-padded context), ``y`` [n] next-word ids (in-vocabulary targets only)."""
    xs: list[list[int]] = []
    ys: list[int] = []
    for comment in comments:
        ids = [index.get(t, UNK_ID) for t in comment]
        for i in range(1, len(ids), stride):
            if ids[i] == UNK_ID:
                continue
            context = ids[max(0, i - max_len) : i]
            xs.append([PAD_ID] * (max_len - len(context)) + context)
            ys.append(ids[i])
    if not ys:
        return torch.zeros(0, max_len, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.tensor(xs, dtype=torch.long), torch.tensor(ys, dtype=torch.long)


def reddit_users(cfg: DataConfig) -> tuple[list[tuple[str, Tensor, Tensor, Tensor, Tensor, int]], int]:
    """Each kept user's ``(name, x_train, y_train, x_eval, y_eval, vocab)`` and the number of output classes."""
    split = []
    for user in sorted(read_leaf(cfg.root), key=lambda u: u.name):
        comments = [c for c in reddit_tokens(user, str(cfg.root)) if len(c) >= 2][: cfg.max_samples_per_user]
        if len(comments) < cfg.min_samples:
            continue
        k = len(comments) - max(1, math.ceil(len(comments) * cfg.eval_fraction))
        split.append((user.name, comments[:k], comments[k:]))
        if cfg.max_users is not None and len(split) >= cfg.max_users:
            break
    if cfg.vocab_file is not None:
        words = read_vocab_file(cfg.vocab_file, cfg.vocab_size)
    else:
        words = build_vocab([c for _, train, _ in split for c in train], cfg.vocab_size)
    index = {w: i + 2 for i, w in enumerate(words)}
    users = []
    for name, train, held_out in split:
        x_train, y_train = next_word_samples(train, index, cfg.max_len, cfg.stride)
        x_eval, y_eval = next_word_samples(held_out, index, cfg.max_len, cfg.stride)
        if len(y_train) and len(y_eval):
            vocab = len({t for c in train for t in c} - SPECIAL)
            users.append((name, x_train, y_train, x_eval, y_eval, vocab))
    return users, len(words) + 2


__all__ = ["PAD_ID", "UNK_ID", "build_vocab", "next_word_samples", "read_vocab_file", "reddit_users"]
