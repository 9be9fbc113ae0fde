"""Per-user federated data: each user's training and held-out tensors, and its size / vocabulary bucket.

A user is a privacy unit and a client. A fraction ``eval_fraction`` of its samples (at least one) is held out, as
LEAF's per-user split does: a seeded random subset for Sent140 (LEAF's files list a user's tweets sorted by label,
so an ordered split would hold out only positives), the last windows for Shakespeare (text order, no overlap).
Buckets: by the number of training samples (``size``) and by the number of distinct words in the user's training
text (``vocab``), with the configured bin edges.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dplit.federated.config import DataConfig, FederatedConfigError
from dplit.federated.leaf import read_leaf, sent140_texts
from dplit.federated.shakespeare import NUM_CHARS, build_roles, next_char_samples

_WORD = re.compile(r"[a-z']+")
_URL = re.compile(r"^(https?://|www\.)", re.I)


@dataclass
class UserData:
    """One user's tensors: ``x_*`` [n, T] int64 inputs, ``y_*`` [n] int64 targets; ``vocab`` distinct words."""

    name: str
    x_train: Tensor
    y_train: Tensor
    x_eval: Tensor
    y_eval: Tensor
    vocab: int


@dataclass
class FederatedData:
    """All users, the number of classes, and each user's bucket ids per bucketing (``size``, ``vocab``)."""

    users: list[UserData]
    num_classes: int
    buckets: dict[str, list[str]] = field(default_factory=dict)  # attribute -> bucket names
    user_bucket: dict[str, list[int]] = field(default_factory=dict)  # attribute -> bucket id per user

    @property
    def num_users(self) -> int:
        return len(self.users)


def bin_names(edges: list[int]) -> list[str]:
    """Bucket names for edges ``[a, b]``: ``<a``, ``a-(b-1)``, ``>=b``."""
    names = [f"<{edges[0]}"]
    names += [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return [*names, f">={edges[-1]}"]


def bin_index(value: int, edges: list[int]) -> int:
    """Bucket id of ``value`` for :func:`bin_names`."""
    return sum(value >= e for e in edges)


def _split(n: int, eval_fraction: float) -> int:
    """Training samples of a user with ``n`` samples (the rest, at least 1, held out)."""
    return n - max(1, math.ceil(n * eval_fraction))


def tweet_tokens(text: str) -> list[str]:
    """Lower-cased whitespace tokens, URLs dropped, ``@user`` -> ``<user>`` (as dplit's TwitterAAE tokenizer; kept
    here because importing ``dplit.data`` loads every DataModule)."""
    return ["<user>" if t.startswith("@") and len(t) > 1 else t.lower() for t in text.split() if not _URL.match(t)]


def _sent140_users(cfg: DataConfig) -> list[tuple[str, Tensor, Tensor, list[str]]]:
    from dplit.text.words import encode_words

    out = []
    for user in sorted(read_leaf(cfg.root), key=lambda u: u.name):
        texts, labels = sent140_texts(user, str(cfg.root))
        texts, labels = texts[: cfg.max_samples_per_user], labels[: cfg.max_samples_per_user]
        x = encode_words(texts, cfg.max_len, tokenize=tweet_tokens)
        out.append((user.name, x, torch.tensor(labels, dtype=torch.long), [" ".join(tweet_tokens(t)) for t in texts]))
    return out


def _shakespeare_users(cfg: DataConfig) -> list[tuple[str, Tensor, Tensor, list[str]]]:
    out = []
    for name, text in build_roles(cfg.root).items():
        x, y = next_char_samples(text, cfg.seq_len, cfg.stride)
        x, y = x[: cfg.max_samples_per_user], y[: cfg.max_samples_per_user]
        covered = text[: len(y) * cfg.stride + cfg.seq_len] if len(y) else ""
        out.append((name, x, y, [covered.lower()]))
    return out


def _user_permutation(seed: int, user: str, n: int) -> Tensor:
    """A permutation of ``range(n)`` fixed by ``seed`` and the user's name (same on every node and run)."""
    digest = hashlib.blake2b(f"{seed}:{user}".encode(), digest_size=8).digest()
    return torch.randperm(n, generator=torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1))


@functools.lru_cache(maxsize=4)
def _load(key: str) -> FederatedData:
    cfg = DataConfig(**json.loads(key))
    if cfg.dataset == "reddit":
        from dplit.federated.reddit import reddit_users

        rows, num_classes = reddit_users(cfg)
        return _bucketed(cfg, [UserData(*row) for row in rows], num_classes)
    raw = _sent140_users(cfg) if cfg.dataset == "sent140" else _shakespeare_users(cfg)
    users = []
    for name, x, y, texts in raw:
        n = len(y)
        if n < cfg.min_samples:
            continue
        k = _split(n, cfg.eval_fraction)
        if cfg.dataset == "shakespeare":  # held-out windows must not overlap the training text
            gap = math.ceil(cfg.seq_len / cfg.stride)
            if k - gap < 1:
                continue
            train_x, train_y = x[: k - gap], y[: k - gap]
            train_text = texts[0][: (k - gap - 1) * cfg.stride + cfg.seq_len + 1]
        else:  # a seeded per-user permutation: LEAF lists a Sent140 user's tweets sorted by label
            perm = _user_permutation(cfg.split_seed, name, n)
            x, y, texts = x[perm], y[perm], [texts[i] for i in perm.tolist()]
            train_x, train_y, train_text = x[:k], y[:k], " ".join(texts[:k])
        vocab = len(set(_WORD.findall(train_text)))
        users.append(UserData(name, train_x, train_y, x[k:], y[k:], vocab))
        if cfg.max_users is not None and len(users) >= cfg.max_users:
            break
    return _bucketed(cfg, users, 2 if cfg.dataset == "sent140" else NUM_CHARS)


def _bucketed(cfg: DataConfig, users: list[UserData], num_classes: int) -> FederatedData:
    if not users:
        raise FederatedConfigError(
            f"no user under {cfg.root} has >= {cfg.min_samples} samples (`data.min_samples`) after the held-out "
            "split: point `data.root` at the dataset or lower the threshold"
        )
    data = FederatedData(users, num_classes)
    for attr, edges, values in (
        ("size", cfg.size_bins, [len(u.y_train) for u in users]),
        ("vocab", cfg.vocab_bins, [u.vocab for u in users]),
    ):
        data.buckets[attr] = bin_names(edges)
        data.user_bucket[attr] = [bin_index(v, edges) for v in values]
    return data


def load_data(cfg: DataConfig) -> FederatedData:
    """The users of ``cfg`` (cached per process: every simulated client of a worker shares one copy)."""
    values = {k: v for k, v in vars(cfg).items()}
    values["root"] = str(Path(cfg.root).expanduser().resolve())
    if cfg.vocab_file is not None:
        values["vocab_file"] = str(Path(cfg.vocab_file).expanduser().resolve())
    return _load(json.dumps(values, sort_keys=True))


__all__ = ["FederatedData", "UserData", "bin_index", "bin_names", "load_data"]
