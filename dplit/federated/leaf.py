"""Readers for the LEAF benchmark's JSON files (Caldas et al. 2018, https://leaf.cmu.edu).

A LEAF file is ``{"users": [u, ...], "num_samples": [n, ...], "user_data": {u: {"x": [...], "y": [...]}}}``; a
dataset folder holds one or more such files (LEAF's ``data/<dataset>/data/{train,test}/*.json``, or the files
themselves). Every structural problem is reported with the file and the key, never as a bare ``KeyError``.

* Sent140: ``x`` rows are ``[id, date, query, user, text, ...]``, ``y`` labels 0 (negative) / 1 (positive).
* Reddit (LEAF's ``reddit`` preprocessing): ``x`` is a list of comments, each a list of token lists (sentences,
  padded with ``<PAD>``); ``y`` a list of dicts whose ``target_tokens`` are the next-word targets. dplit reads the
  tokens of each comment (``<PAD>`` dropped), which is what next-word prediction needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED_KEYS = ("users", "num_samples", "user_data")
SENT140_TEXT_COLUMN = 4
REDDIT_SPECIAL = frozenset({"<PAD>"})


class LeafFormatError(ValueError):
    """A LEAF file that does not have LEAF's structure; the message names the file and the key."""


@dataclass(frozen=True)
class LeafUser:
    """One LEAF user: its raw ``x`` rows and ``y`` targets (equal lengths)."""

    name: str
    x: list[Any]
    y: list[Any]


def leaf_files(root: str | Path) -> list[Path]:
    """The LEAF JSON files under ``root`` (a file, or a folder searched recursively), sorted by path."""
    path = Path(root).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"LEAF data not found at {path}: set `data.root` to a LEAF JSON file or a folder holding them "
            "(LEAF's data/<dataset>/data/test/*.json, produced by LEAF's preprocess.sh)"
        )
    files = sorted(p for p in path.rglob("*.json") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.json file under {path}: `data.root` must hold LEAF JSON files")
    return files


def read_leaf_file(path: Path) -> list[LeafUser]:
    """Parses one LEAF JSON file into its users, in the file's ``users`` order."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LeafFormatError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(data, dict):
        raise LeafFormatError(f"{path}: a LEAF file is a JSON object with keys {list(REQUIRED_KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise LeafFormatError(f"{path}: missing key {key!r} (a LEAF file has {list(REQUIRED_KEYS)})")
    users, counts, user_data = data["users"], data["num_samples"], data["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
        raise LeafFormatError(f"{path}: 'users' and 'num_samples' must be lists of equal length")
    if not isinstance(user_data, dict):
        raise LeafFormatError(f"{path}: 'user_data' must be an object {{user: {{'x': [...], 'y': [...]}}}}")
    out = []
    for name, count in zip(users, counts, strict=True):
        record = user_data.get(name)
        if not isinstance(record, dict):
            raise LeafFormatError(f"{path}: user {name!r} is listed in 'users' but missing from 'user_data'")
        for key in ("x", "y"):
            if not isinstance(record.get(key), list):
                raise LeafFormatError(f"{path}: missing key 'user_data'[{name!r}][{key!r}] (a list)")
        x, y = record["x"], record["y"]
        if len(x) != len(y) or len(x) != count:
            raise LeafFormatError(
                f"{path}: user {name!r} has {len(x)} x and {len(y)} y rows but 'num_samples' says {count}"
            )
        out.append(LeafUser(str(name), x, y))
    return out


def read_leaf(root: str | Path) -> list[LeafUser]:
    """Every user of every LEAF file under ``root``; a user in several files has its rows concatenated."""
    merged: dict[str, LeafUser] = {}
    for path in leaf_files(root):
        for user in read_leaf_file(path):
            old = merged.get(user.name)
            merged[user.name] = user if old is None else LeafUser(user.name, old.x + user.x, old.y + user.y)
    return list(merged.values())


def sent140_texts(user: LeafUser, source: str = "") -> tuple[list[str], list[int]]:
    """(tweet texts, labels 0/1) of a Sent140 user; rows must be ``[id, date, query, user, text, ...]``."""
    texts, labels = [], []
    for row, label in zip(user.x, user.y, strict=True):
        if (
            not isinstance(row, list)
            or len(row) <= SENT140_TEXT_COLUMN
            or not isinstance(row[SENT140_TEXT_COLUMN], str)
        ):
            raise LeafFormatError(
                f"{source}: user {user.name!r}: a Sent140 'x' row must be [id, date, query, user, text, ...]; "
                f"got {row!r}"
            )
        if label not in (0, 1, "0", "1"):
            raise LeafFormatError(f"{source}: user {user.name!r}: Sent140 labels are 0/1, got {label!r}")
        texts.append(row[SENT140_TEXT_COLUMN])
        labels.append(int(label))
    return texts, labels


def reddit_tokens(user: LeafUser, source: str = "") -> list[list[str]]:
    """The token sequence of each comment of a LEAF Reddit user (sentences joined, ``<PAD>`` dropped)."""
    comments = []
    for comment in user.x:
        if not isinstance(comment, list) or not all(isinstance(s, list) for s in comment):
            raise LeafFormatError(
                f"{source}: user {user.name!r}: a Reddit 'x' entry must be a list of token lists, got {comment!r:.80}"
            )
        comments.append([str(t) for sentence in comment for t in sentence if t not in REDDIT_SPECIAL])
    return comments


__all__ = [
    "LeafFormatError",
    "LeafUser",
    "leaf_files",
    "read_leaf",
    "read_leaf_file",
    "reddit_tokens",
    "sent140_texts",
]
