"""Counterfactual Data Augmentation (CDA): swap gendered words both ways, from a word-pair file.

A word-pair file has one pair a line, ``word<TAB>counterpart`` (spaces around the tab and ``\\r\\n`` endings are
allowed, as in WinoBias' ``generalized_swaps.txt``); blank lines and lines starting with ``#`` are skipped. A line
without exactly two one-word fields is an error naming the file and the line number.

Swapping is two-sided: every line ``a b`` maps ``a -> b``, and ``b -> a`` unless ``b`` has a line of its own. When
several lines claim one word (``priest nun`` and ``priest priestess``; ``boy girl`` and ``guy girl`` reversed), the
first line wins and the others are listed in :attr:`WordSwapper.conflicts` (logged once).

Rules, applied per word token (letters with inner apostrophes, e.g. ``ma'am``):

- *Case* follows the source token: ``he -> she``, ``He -> She``, ``HE -> SHE``.
- *Punctuation* around a word is kept; a pair written with a final period (``mr. mrs.``) matches ``Mr.`` only.
- *Possessives and clitics*: ``man's -> woman's``, ``boys' -> girls'``, ``he's -> she's``, ``she'll -> he'll``
  (``'s 'll 'd 're 've``, straight or curly apostrophe).
- *Pronouns* are built in and override the file's lines for these words: ``he<->she``, ``him->her``,
  ``himself<->herself``, ``hers->his``, and the two ambiguous ones, decided by the next token:

  * ``her`` is a possessive determiner (``-> his``) when the next token is a word that is not a closed-class
    word (:data:`NOT_NOUN_PHRASE`: determiners, pronouns, prepositions, conjunctions, auxiliaries, common adverbs
    such as ``again``); otherwise (end of text, punctuation, a closed-class word) it is an object pronoun
    (``-> him``). ``her book -> his book``, ``her own car -> his own car``; ``saw her. -> saw him.``,
    ``gave her the key -> gave him the key``, ``told her that -> told him that``. Known miss: ``gave her flowers``
    (object + bare noun) becomes ``gave his flowers``.
  * ``his`` mirrors it: ``his book -> her book``; ``the car is his. -> the car is hers.``

- *Names* (optional second pair file, e.g. ``John Mary``): swapped two-sided like words, but only where the token
  starts with a capital letter (so ``Will``/``will`` and ``Rose``/``rose`` stay apart).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["NOT_NOUN_PHRASE", "PRONOUNS", "WordPair", "WordPairFileError", "WordSwapper", "read_word_pairs"]

log = logging.getLogger(__name__)

PRONOUNS: dict[str, str] = {"he": "she", "she": "he", "him": "her", "himself": "herself", "herself": "himself",
                            "hers": "his"}  # fmt: skip
"""Fixed pronoun swaps; ``her`` and ``his`` depend on the next token (see the module docstring)."""

NOT_NOUN_PHRASE = frozenset(
    # determiners and pronouns
    "a an the this that these those some any no every each all both either neither another such what which who whom "
    "whose i me my you your he him his she her it its we us our they them their myself yourself himself herself "
    "itself ourselves themselves one "
    # prepositions and particles
    "about above across after against along among around as at before behind below beneath beside between beyond by "
    "down during except for from in inside into like near of off on onto out outside over past since through "
    "throughout till to toward towards under until up upon with within without away back "
    # conjunctions
    "and but or nor so yet if because although though while whereas unless than whether when where why how "
    # auxiliaries and copulas
    "is are was were be been being am do does did have has had will would shall should can could may might must "
    # adverbs that follow an object pronoun
    "again also too very much still just now then there here today tomorrow yesterday tonight already always never "
    "often sometimes ever first last once twice anyway either instead well alone enough".split()
)
"""Words after which ``her`` is an object pronoun (``-> him``) and ``his`` a possessive pronoun (``-> hers``)."""

_PRONOUN_WORDS = frozenset(PRONOUNS) | {"his", "her"}
_LETTERS = r"[^\W\d_]"
# A word: letters with inner apostrophes, then a trailing apostrophe (plural possessive) or a period (``mr.``).
_TOKEN = re.compile(rf"{_LETTERS}+(?:['\u2019]{_LETTERS}+)*(?:['\u2019](?!{_LETTERS}))?\.?")
_CLITICS = ("s", "ll", "d", "re", "ve")
_FIELD = re.compile(rf"^{_LETTERS}[^\s]*$")


class WordPairFileError(ValueError):
    """A word-pair file has a line that is not ``word<TAB>counterpart``."""


@dataclass(frozen=True)
class WordPair:
    """One line of a word-pair file (lower-cased)."""

    source: str
    target: str
    file: str
    line: int


def read_word_pairs(path: str | Path) -> list[WordPair]:
    """The pairs of a word-pair file (one ``word<TAB>counterpart`` a line), lower-cased, in file order.

    Raises:
        FileNotFoundError: no such file.
        WordPairFileError: a line that is not two one-word fields; the message names the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word-pair file {path} not found (one `word<TAB>counterpart` pair a line)")
    pairs = []
    text = path.read_text(encoding="utf-8-sig", errors="strict")
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")] if "\t" in line else line.split()
        if len(fields) != 2 or not all(_FIELD.match(f) for f in fields):
            raise WordPairFileError(
                f"{path}, line {number}: {raw.rstrip()!r} is not a word pair. Fix: write one pair a line as "
                "`word<TAB>counterpart` (two single words, e.g. `actor\tactress`), or start the line with `#`."
            )
        pairs.append(WordPair(fields[0].lower(), fields[1].lower(), str(path), number))
    if not pairs:
        raise WordPairFileError(f"{path} has no word pairs (one `word<TAB>counterpart` pair a line)")
    return pairs


def _two_sided(pairs: Iterable[WordPair], conflicts: list[str]) -> dict[str, str]:
    """``a -> b`` for every line, ``b -> a`` where ``b`` has no line of its own; the first claim wins."""
    pairs = list(pairs)
    explicit: dict[str, WordPair] = {}
    for p in pairs:
        first = explicit.setdefault(p.source, p)
        if first.target != p.target:
            kept = f"kept {first.file}:{first.line} -> {first.target}"
            conflicts.append(f"{p.file}:{p.line} {p.source} -> {p.target} ({kept})")
    mapping = {s: p.target for s, p in explicit.items()}
    reverse: dict[str, WordPair] = {}
    for p in pairs:
        if p.target in explicit or explicit[p.source] is not p:
            continue
        first = reverse.setdefault(p.target, p)
        if first.source != p.source:
            kept = f"kept {first.file}:{first.line} -> {first.source}"
            conflicts.append(f"{p.file}:{p.line} {p.target} -> {p.source} by reversal ({kept})")
    mapping.update({t: p.source for t, p in reverse.items()})
    return mapping


def _cased(target: str, source: str) -> str:
    if len(source) > 1 and source.isupper():
        return target.upper()
    return target[:1].upper() + target[1:] if source[:1].isupper() else target


class WordSwapper:
    """Two-sided gender swapping (CDA) of texts, from word-pair files; see the module docstring for the rules.

    Args:
        word_files: Word-pair files (e.g. ``gender_swaps/generalized_swaps.txt``), read in order (earlier files win
            conflicts).
        name_files: Optional name-pair files (``John<TAB>Mary``), swapped only where capitalised.
    """

    def __init__(self, word_files: Iterable[str | Path], name_files: Iterable[str | Path] = ()) -> None:
        self.conflicts: list[str] = []
        pairs = [p for f in word_files for p in read_word_pairs(f)]
        words = [p for p in pairs if not {p.source, p.target} & _PRONOUN_WORDS]
        self.ignored = [p for p in pairs if {p.source, p.target} & _PRONOUN_WORDS]
        """Lines of the word files that name a pronoun (the built-in rules decide those)."""
        self.words = _two_sided(words, self.conflicts)
        self.names = _two_sided((p for f in name_files for p in read_word_pairs(f)), self.conflicts)
        if not self.words and not self.names:
            raise ValueError("WordSwapper: the word-pair files give no swaps besides the built-in pronouns")
        if self.conflicts:
            log.warning("CDA word pairs: %d conflicting line(s), first claim kept: %s", len(self.conflicts),
                        "; ".join(self.conflicts[:5]) + (" ..." if len(self.conflicts) > 5 else ""))  # fmt: skip

    def _lookup(self, word: str, next_word: str | None) -> str | None:
        low = word.lower()
        if low in ("her", "his"):
            noun_follows = next_word is not None and next_word.lower() not in NOT_NOUN_PHRASE
            return ("his" if noun_follows else "him") if low == "her" else ("her" if noun_follows else "hers")
        swapped = PRONOUNS.get(low) or self.words.get(low)
        if swapped is None and word[:1].isupper():
            swapped = self.names.get(low)
        return swapped

    def _swap_token(self, token: str, next_word: str | None) -> str | None:
        """The counterfactual of one token (with its possessive, clitic or period), or None if it has none."""
        candidates = [(token, "")]
        if token.endswith("."):
            candidates.append((token[:-1], "."))
        for stem, tail in list(candidates):
            for apo in ("'", "\u2019"):
                if stem.endswith(apo):  # plural possessive: boys'
                    candidates.append((stem[:-1], apo + tail))
                head, sep, clitic = stem.rpartition(apo)
                if sep and clitic.lower() in _CLITICS:
                    candidates.append((head, sep + clitic + tail))
        for stem, tail in candidates:
            swapped = self._lookup(stem, next_word if not tail else None)  # "her." ends its phrase
            if swapped is not None:
                return _cased(swapped, stem) + tail
        return None

    def swap(self, text: str) -> str:
        """The counterfactual of ``text``: every gendered word (and name) replaced by its counterpart."""
        return self.swap_counted(text)[0]

    def swap_counted(self, text: str) -> tuple[str, int]:
        """``(counterfactual, number of swapped words)``."""
        matches = list(_TOKEN.finditer(text))
        out, last, count = [], 0, 0
        for i, m in enumerate(matches):
            # the next word counts only when nothing but spaces separates it (punctuation ends the phrase)
            adjacent = i + 1 < len(matches) and text[m.end() : matches[i + 1].start()].strip() == ""
            swapped = self._swap_token(m.group(), matches[i + 1].group() if adjacent else None)
            if swapped is not None:
                out.append(text[last : m.start()] + swapped)
                last, count = m.end(), count + 1
        out.append(text[last:])
        return "".join(out), count
