"""Sentiment/dialect cells from the raw TwitterAAE corpus, as Elazar & Goldberg (EMNLP 2018).

The raw corpus ``twitteraae_all`` (from ``TwitterAAE-full-v1.zip``, http://slanglab.cs.umass.edu/TwitterAAE/) holds
one tweet a line in 10 tab-separated fields: tweet id, timestamp, user id, location ``[lon, lat]``, census
blockgroup, text, then the posterior demographic proportions AA, Hispanic, Other and White.

The recipe (also used by Bagdasaryan & Shmatikov 2019), with the defaults of :class:`LabelRecipe`:

- dialect ``aae`` if ``P(AA) > 0.8``, else ``sae`` if ``P(White) > 0.8``, else dropped (strict ``>``);
- sentiment ``happy`` if a happy symbol occurs, ``sad`` if a sad one does; tweets with both or neither are dropped;
- every happy/sad symbol is removed from the text (also when glued to a word, ``great:)``; an ASCII emoticon is not
  matched when a letter or digit follows it (or precedes it, for one starting with a letter), so ``:Dallas`` and
  ``AND:`` are left alone; a trailing U+FE0F variation selector goes with its emoji);
- ``@mentions`` (tokens starting with ``@``) become ``_TWITTER-ENTITY_``; tokens are whitespace-separated and
  re-joined by single spaces;
- tweets with fewer than 3 tokens after cleaning are dropped, and cleaned texts are de-duplicated over the corpus
  (the first occurrence is kept, whichever its cell).

Default symbols. Happy: ``:) :-) :] :D :-D =) =D ;) ;-) ^_^ (: 😀 😁 😂 😃 😄 😆 😊 😍 😘 ☺ 🙂 😉``. Sad:
``:( :-( :[ :'( :'-( =( >:( D: ): 😞 😟 😢 😭 😠 😡 😔 😩 😫 ☹ 🙁 💔``.

:func:`fetch_raw_corpus` finds the corpus under a folder, or extracts it from the archive there, downloading the
archive first (atomically, with a progress bar) when asked.

Caps use bottom-k sampling on a seeded hash of each cleaned text, a deterministic reservoir: the kept tweets,
and their order (by hash), depend on the seed and the set of texts, not on the order of the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dplit.data.twitteraae import LABELLED_FILES, MENTION_TOKEN

__all__ = [
    "CELLS",
    "LabelRecipe",
    "RawTweet",
    "build_cells",
    "cached_cells",
    "iter_raw",
    "label_tweet",
    "write_cells",
]

CELLS = LABELLED_FILES  # ("aae_happy", "aae_sad", "sae_happy", "sae_sad")
N_FIELDS = 10
HAPPY = (":)", ":-)", ":]", ":D", ":-D", "=)", "=D", ";)", ";-)", "^_^", "(:", "😀", "😁", "😂", "😃", "😄", "😆",
         "😊", "😍", "😘", "☺", "🙂", "😉")  # fmt: skip
SAD = (":(", ":-(", ":[", ":'(", ":'-(", "=(", ">:(", "D:", "):", "😞", "😟", "😢", "😭", "😠", "😡", "😔", "😩",
       "😫", "☹", "🙁", "💔")  # fmt: skip
DROP_REASONS = ("dialect", "no_symbol", "both_symbols", "too_short", "duplicate")


@dataclass(frozen=True)
class LabelRecipe:
    """Settings of the labelling recipe."""

    aae_threshold: float = 0.8
    """A tweet is AAE when P(AA) is strictly above this."""
    sae_threshold: float = 0.8
    """A tweet is SAE when it is not AAE and P(White) is strictly above this."""
    happy: tuple[str, ...] = HAPPY
    """Symbols that make a tweet positive."""
    sad: tuple[str, ...] = SAD
    """Symbols that make a tweet negative."""
    min_tokens: int = 3
    """Tweets with fewer whitespace tokens after cleaning are dropped."""
    mention_token: str = MENTION_TOKEN
    """Replacement for ``@user`` tokens."""

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the settings."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RawTweet:
    """One line of ``twitteraae_all``."""

    tweet_id: str
    timestamp: str
    user_id: str
    location: str
    blockgroup: str
    text: str
    p_aa: float
    p_hispanic: float
    p_other: float
    p_white: float


def iter_raw(path: str | Path, stats: dict[str, int] | None = None) -> Iterator[RawTweet]:
    """Streams the raw corpus line by line, skipping malformed lines.

    Args:
        path: the ``twitteraae_all`` file.
        stats: when given, ``"lines"`` and ``"malformed"`` are incremented in it.

    Yields:
        The well-formed tweets (10 fields, 4 finite floats), text decoded as UTF-8 with ``errors="replace"``.
    """
    stats = {} if stats is None else stats
    stats.setdefault("lines", 0)
    stats.setdefault("malformed", 0)
    with open(path, "rb") as f:
        for raw in f:
            stats["lines"] += 1
            fields = raw.rstrip(b"\r\n").decode("utf-8", errors="replace").split("\t")
            try:
                if len(fields) != N_FIELDS:
                    raise ValueError
                probs = [float(x) for x in fields[6:]]
                if not all(math.isfinite(p) for p in probs):
                    raise ValueError
            except ValueError:
                stats["malformed"] += 1
                continue
            yield RawTweet(*fields[:6], *probs)  # type: ignore[arg-type]


def _pattern(symbols: tuple[str, ...]) -> re.Pattern[str]:
    alts = []
    for s in sorted(set(symbols), key=len, reverse=True):  # longest first: ">:(" before ":("
        if s.isascii():  # not inside a word: "great:)" matches, ":Dallas" and "AND:" do not
            before = r"(?<![A-Za-z0-9])" if s[0].isalnum() else ""
            alts.append(before + re.escape(s) + r"(?![A-Za-z0-9])")
        else:
            alts.append(re.escape(s) + "\ufe0f?")
    return re.compile("|".join(alts))


_PATTERNS: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[re.Pattern[str], re.Pattern[str]]] = {}


def _label(text: str, p_aa: float, p_white: float, recipe: LabelRecipe) -> tuple[str, str, str] | str:
    """The labelled tweet, or the reason it is dropped (one of :data:`DROP_REASONS` but ``duplicate``)."""
    if p_aa > recipe.aae_threshold:
        dialect = "aae"
    elif p_white > recipe.sae_threshold:
        dialect = "sae"
    else:
        return "dialect"
    key = (recipe.happy, recipe.sad)
    if key not in _PATTERNS:
        _PATTERNS[key] = (_pattern(recipe.happy), _pattern(recipe.sad))
    happy_re, sad_re = _PATTERNS[key]
    is_happy, is_sad = happy_re.search(text) is not None, sad_re.search(text) is not None
    if is_happy == is_sad:
        return "both_symbols" if is_happy else "no_symbol"
    # Remove both sets together (they may overlap, e.g. "(:" and ":("), replacing by a space so words stay apart.
    text = sad_re.sub(" ", happy_re.sub(" ", text))
    tokens = [recipe.mention_token if t.startswith("@") and len(t) > 1 else t for t in text.split()]
    if len(tokens) < recipe.min_tokens:
        return "too_short"
    return dialect, "happy" if is_happy else "sad", " ".join(tokens)


def label_tweet(
    text: str, p_aa: float, p_white: float, recipe: LabelRecipe | None = None
) -> tuple[str, str, str] | None:
    """Labels one tweet with the recipe.

    Returns:
        ``(dialect, sentiment, cleaned_text)`` with dialect ``"aae"``/``"sae"`` and sentiment ``"happy"``/``"sad"``,
        or None when the tweet is dropped.
    """
    out = _label(text, p_aa, p_white, recipe or LabelRecipe())
    return None if isinstance(out, str) else out


def _priority(seed: int, text: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest(), "big")


def build_cells(
    path: str | Path, recipe: LabelRecipe | None = None, caps: dict[str, int] | None = None, seed: int = 0
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """Labels the raw corpus into the 4 cells ``aae_happy, aae_sad, sae_happy, sae_sad``, streaming.

    Args:
        path: the raw ``twitteraae_all`` file.
        recipe: labelling settings.
        caps: optional maximum tweets per cell; cells not named are uncapped.
        seed: seed of the hash that decides which tweets a capped cell keeps, and the order of every cell.

    Returns:
        ``(cells, stats)``: cell -> cleaned tweets; stats with ``lines``, ``malformed``, ``dropped_<reason>`` for
        each reason in :data:`DROP_REASONS` and ``kept_<cell>`` / ``capped_<cell>`` (labelled but over the cap).
    """
    recipe = recipe or LabelRecipe()
    caps = dict(caps or {})
    unknown = set(caps) - set(CELLS)
    if unknown or any(c < 0 for c in caps.values()):
        raise ValueError(f"caps must map cells {CELLS} to non-negative ints, got {caps}")
    stats: dict[str, int] = {"lines": 0, "malformed": 0, **{f"dropped_{r}": 0 for r in DROP_REASONS}}
    stats.update({f"capped_{c}": 0 for c in CELLS})
    seen: set[bytes] = set()
    heaps: dict[str, list[tuple[int, str]]] = {c: [] for c in CELLS}  # min-heaps of (-priority, text)
    for tweet in iter_raw(path, stats):
        out = _label(tweet.text, tweet.p_aa, tweet.p_white, recipe)
        if isinstance(out, str):
            stats[f"dropped_{out}"] += 1
            continue
        dialect, sentiment, text = out
        digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
        if digest in seen:
            stats["dropped_duplicate"] += 1
            continue
        seen.add(digest)
        heap, cap = heaps[f"{dialect}_{sentiment}"], caps.get(f"{dialect}_{sentiment}")
        item = (-_priority(seed, text), text)
        if cap is None or len(heap) < cap:
            heapq.heappush(heap, item)
        else:
            stats[f"capped_{dialect}_{sentiment}"] += 1
            if cap > 0 and item > heap[0]:  # smaller priority than the largest kept one: swap them
                heapq.heapreplace(heap, item)
    cells: dict[str, list[str]] = {}
    for cell, heap in heaps.items():
        cells[cell] = [text for _, text in sorted(heap, reverse=True)]  # ascending priority
        stats[f"kept_{cell}"] = len(cells[cell])
    return cells, stats


def write_cells(cells: dict[str, list[str]], out_dir: str | Path) -> Path:
    """Writes each cell as a file named after it, one tweet per ``\\n``-terminated line, in UTF-8.

    The layout is that of the labelled files, so :func:`dplit.data.twitteraae.read_labelled_tweets` reads it back.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for cell, tweets in cells.items():
        if any("\n" in t for t in tweets):
            raise ValueError(f"a tweet of {cell} contains a newline")
        (out_dir / cell).write_bytes("".join(t + "\n" for t in tweets).encode("utf-8"))
    return out_dir


def cached_cells(
    path: str | Path,
    recipe: LabelRecipe | None = None,
    caps: dict[str, int] | None = None,
    seed: int = 0,
    cache_dir: str | Path = ".cache/twitteraae_cells",
) -> tuple[dict[str, list[str]], dict[str, int]]:
    """:func:`build_cells`, cached under ``cache_dir/<fingerprint>/``.

    The fingerprint covers the recipe, caps, seed and the source's resolved path, size and mtime. A hit reads the
    cells with the labelled-file reader and ``stats.json``; ``stats.json`` is written last, so an interrupted write
    is not a hit.
    """
    recipe = recipe or LabelRecipe()
    st = os.stat(path)
    key = {"recipe": recipe.fingerprint(), "caps": sorted((caps or {}).items()), "seed": seed,
           "source": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}  # fmt: skip
    folder = Path(cache_dir) / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    stats_path = folder / "stats.json"
    if stats_path.is_file():
        from dplit.data.twitteraae import read_labelled_tweets

        return read_labelled_tweets(folder), json.loads(stats_path.read_text(encoding="utf-8"))
    cells, stats = build_cells(path, recipe, caps, seed)
    write_cells(cells, folder)
    tmp = folder / "stats.json.tmp"
    tmp.write_text(json.dumps(stats, sort_keys=True), encoding="utf-8")
    os.replace(tmp, stats_path)
    return cells, stats
