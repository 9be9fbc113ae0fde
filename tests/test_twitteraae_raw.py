"""Labelling recipe over the raw TwitterAAE corpus: tiny fixtures in the exact ``twitteraae_all`` format."""

from __future__ import annotations

from pathlib import Path

import pytest

import dplit.data.twitteraae_raw as raw
from dplit.data.twitteraae import MENTION_TOKEN, read_labelled_tweets
from dplit.data.twitteraae_raw import LabelRecipe, build_cells, cached_cells, iter_raw, label_tweet, write_cells

R = LabelRecipe()


def _line(i: int, text: str, p_aa: float, p_white: float) -> bytes:
    rest = max(0.0, 1.0 - p_aa - p_white)
    fields = [
        str(400000000000000000 + i),
        "Mon Mar 03 21:44:08 +0000 2014",
        str(100000 + i),
        "[-84.38798, 33.74899]",
        "131210035001",
        text,
        repr(p_aa),
        repr(rest / 2),
        repr(rest / 2),
        repr(p_white),
    ]
    return "\t".join(fields).encode("utf-8") + b"\n"


ROWS: list[tuple[str, float, float]] = [
    ("@bae finna go to the mall :)", 0.9, 0.05),  # aae_happy, mention replaced
    ("this game was great:) for real", 0.95, 0.01),  # glued emoticon
    ("i miss my grandma so much 😭😭", 0.85, 0.1),  # aae_sad, repeated emoji
    ("happy birthday to my brother 😊", 0.05, 0.9),  # sae_happy
    ("worst day at work ever :'(", 0.02, 0.81),  # sae_sad
    ("love it :) but hate it :(", 0.9, 0.05),  # both: dropped
    ("just a normal tweet with words", 0.9, 0.05),  # neither: dropped
    ("ok :)", 0.9, 0.05),  # too short
    ("@bae  finna go to the mall :)", 0.92, 0.03),  # duplicate after cleaning
    ("boundary tweet is here :)", 0.8, 0.1),  # P(AA) = 0.8 exactly: not AAE, not SAE
    ("boundary white tweet here :(", 0.1, 0.8),  # P(White) = 0.8 exactly: dropped
    ("smiling ☺️ at the sunset today", 0.1, 0.85),  # emoji + variation selector
]
BAD_UTF8 = b"400000000000000099\tMon Mar 03 21:44:08 +0000 2014\t99\t[-84.3, 33.7]\t131210035001\tso hype \xff\xfe today :D\t0.9\t0.03\t0.03\t0.04\n"  # noqa: E501
MALFORMED = [
    b"only\tthree\tfields\n",
    _line(50, "bad floats here :)", 0.9, 0.05).replace(b"\t0.9\t", b"\tnot_a_float\t"),
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "twitteraae_all"
    body = b"".join(_line(i, t, a, w) for i, (t, a, w) in enumerate(ROWS))
    path.write_bytes(body + MALFORMED[0] + BAD_UTF8 + MALFORMED[1])
    return path


def test_label_tweet_cases() -> None:
    assert label_tweet("@bae finna go to the mall :)", 0.9, 0.05, R) == (
        "aae",
        "happy",
        f"{MENTION_TOKEN} finna go to the mall",
    )
    assert label_tweet("this game was great:) for real", 0.95, 0.0, R) == (
        "aae",
        "happy",
        "this game was great for real",
    )
    assert label_tweet("i miss my grandma 😭😭", 0.85, 0.1, R) == ("aae", "sad", "i miss my grandma")
    assert label_tweet("worst day >:( ever now", 0.0, 0.9, R) == ("sae", "sad", "worst day ever now")
    assert label_tweet("smiling ☺️ at sunset", 0.0, 0.9, R) == ("sae", "happy", "smiling at sunset")
    assert label_tweet("D: that was so scary", 0.9, 0.0, R) == ("aae", "sad", "that was so scary")
    # ASCII emoticons inside words are not symbols.
    assert label_tweet("going to :Dallas AND: more", 0.9, 0.0, R) is None
    assert label_tweet("love it :) but hate it :(", 0.9, 0.0, R) is None  # both
    assert label_tweet("a tweet with no symbol", 0.9, 0.0, R) is None  # neither
    assert label_tweet("ok :)", 0.9, 0.0, R) is None  # too short
    assert label_tweet("nice one my friend :)", 0.8, 0.8, R) is None  # boundaries are strict
    assert label_tweet("nice one my friend :)", 0.8000001, 0.0, R) is not None
    assert label_tweet("ok :)", 0.9, 0.0, LabelRecipe(min_tokens=1)) == ("aae", "happy", "ok")
    assert label_tweet("yay :) fun times", 0.9, 0.0, LabelRecipe(happy=("yay",))) == ("aae", "happy", ":) fun times")


def test_iter_raw_skips_and_counts_malformed(corpus: Path) -> None:
    stats: dict[str, int] = {}
    tweets = list(iter_raw(corpus, stats))
    assert stats == {"lines": len(ROWS) + 3, "malformed": 2}
    assert len(tweets) == len(ROWS) + 1
    assert tweets[0].tweet_id == "400000000000000000" and tweets[0].location == "[-84.38798, 33.74899]"
    assert tweets[0].p_aa == 0.9 and tweets[0].p_white == 0.05
    assert tweets[-1].text == "so hype \ufffd\ufffd today :D"


def test_build_cells_contents_and_stats(corpus: Path) -> None:
    cells, stats = build_cells(corpus, R)
    assert sorted(cells["aae_happy"]) == sorted(
        [f"{MENTION_TOKEN} finna go to the mall", "this game was great for real", "so hype \ufffd\ufffd today"]
    )
    assert cells["aae_sad"] == ["i miss my grandma so much"]
    assert sorted(cells["sae_happy"]) == ["happy birthday to my brother", "smiling at the sunset today"]
    assert cells["sae_sad"] == ["worst day at work ever"]
    assert stats["lines"] == len(ROWS) + 3 and stats["malformed"] == 2
    assert stats["dropped_dialect"] == 2
    assert stats["dropped_both_symbols"] == 1
    assert stats["dropped_no_symbol"] == 1
    assert stats["dropped_too_short"] == 1
    assert stats["dropped_duplicate"] == 1
    assert [stats[f"kept_{c}"] for c in raw.CELLS] == [3, 1, 2, 1]
    assert all(stats[f"capped_{c}"] == 0 for c in raw.CELLS)


def _many(tmp_path: Path, order: list[int], name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join(_line(i, f"tweet number {i} here :)", 0.9, 0.05) for i in order))
    return path


def test_caps_seed_determinism_and_order_independence(tmp_path: Path) -> None:
    a = _many(tmp_path, list(range(200)), "a")
    b = _many(tmp_path, list(reversed(range(200))), "b")
    caps = {"aae_happy": 17, "aae_sad": 0}
    cells_a, stats_a = build_cells(a, R, caps, seed=1)
    cells_b, _ = build_cells(b, R, caps, seed=1)
    assert len(cells_a["aae_happy"]) == 17 and stats_a["capped_aae_happy"] == 183
    assert cells_a == cells_b  # same texts, other order: same cells, same order
    assert build_cells(a, R, caps, seed=1)[0] == cells_a
    assert set(build_cells(a, R, caps, seed=2)[0]["aae_happy"]) != set(cells_a["aae_happy"])
    assert len(set(cells_a["aae_happy"])) == 17
    with pytest.raises(ValueError):
        build_cells(a, R, {"nope": 1})


def test_write_cells_round_trip(corpus: Path, tmp_path: Path) -> None:
    cells, _ = build_cells(corpus, R)
    assert read_labelled_tweets(write_cells(cells, tmp_path / "out")) == cells


def test_cached_cells_hit(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = cached_cells(corpus, R, {"aae_happy": 2}, seed=3, cache_dir=tmp_path / "cache")
    assert len(first[0]["aae_happy"]) == 2

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache miss")

    monkeypatch.setattr(raw, "iter_raw", boom)
    assert cached_cells(corpus, R, {"aae_happy": 2}, seed=3, cache_dir=tmp_path / "cache") == first
    with pytest.raises(AssertionError, match="cache miss"):
        cached_cells(corpus, R, {"aae_happy": 2}, seed=4, cache_dir=tmp_path / "cache")
    assert R.fingerprint() == LabelRecipe().fingerprint() != LabelRecipe(min_tokens=4).fingerprint()
