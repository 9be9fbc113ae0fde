"""TweetsDataModule: tiny labelled and raw TwitterAAE fixtures in the real formats, plus the real AAE files."""

from __future__ import annotations

import io
import logging
import os
import zipfile
from pathlib import Path
from typing import Any
from urllib.error import URLError

import pytest
import torch

import dplit.data.tweets as tweets
import dplit.data.twitteraae_archive as archive
import dplit.download
from dplit.data.tweets import LABEL_EMOJI, TweetsDataModule, clean_cells
from dplit.text.words import word_hash

REAL_AAE = Path(__file__).resolve().parents[2] / "shared" / "data" / "twitteraae" / "aae_sentiment"
CELL_WORDS = {"sae_happy": ("sae", "happy"), "sae_sad": ("sae", "sad"), "aae_happy": ("aae", "happy"),
              "aae_sad": ("aae", "sad")}  # fmt: skip
N_PLAIN = 60  # plain tweets per fixture cell; 62 usable with the stray-\r and the invalid-UTF-8 line


def _labelled_lines(cell: str, n: int = N_PLAIN) -> list[bytes]:
    dialect, sentiment = CELL_WORDS[cell]
    plain = [f"{dialect} {sentiment} tweet number {i} _TWITTER-ENTITY_ lol".encode() for i in range(n)]
    return [
        *plain,
        *plain[:5],  # duplicates within the cell
        *(f"{dialect} ambiguous shared text {k}".encode() for k in range(4)),  # in happy and sad: dropped
        f"{dialect} {sentiment} has\ra stray cr".encode(),  # the real files hold one \r inside a tweet
        b"so hype \xff\xfe today " + f"{dialect} {sentiment}".encode(),  # invalid UTF-8, as in the real files
        b"https://t.co/xyz",  # no word token: dropped
    ]


def _write_labelled(root: Path, cells: tuple[str, ...] = tuple(CELL_WORDS), reverse: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        lines = _labelled_lines(cell)
        (root / cell).write_bytes(b"".join(line + b"\n" for line in (lines[::-1] if reverse else lines)))
    return root


def _raw_line(i: int, text: str, p_aa: float, p_white: float) -> bytes:
    rest = max(0.0, 1.0 - p_aa - p_white)
    fields = [str(400000000000000000 + i), "Mon Mar 03 21:44:08 +0000 2014", str(100000 + i), "[-84.38798, 33.74899]",
              "131210035001", text, repr(p_aa), repr(rest / 2), repr(rest / 2), repr(p_white)]  # fmt: skip
    return "\t".join(fields).encode("utf-8") + b"\n"


def _raw_corpus(n: int = 20) -> bytes:
    """``n`` tweets per cell in the 10-field ``twitteraae_all`` format, plus lines the recipe drops."""
    lines: list[bytes] = []
    for cell, (dialect, sentiment) in CELL_WORDS.items():
        p_aa, p_white = (0.9, 0.05) if dialect == "aae" else (0.05, 0.9)
        symbol = ":)" if sentiment == "happy" else "😭"
        lines += [
            _raw_line(len(lines), f"@bae {dialect} {sentiment} tweet {i} {symbol}", p_aa, p_white) for i in range(n)
        ]
    lines.append(_raw_line(len(lines), "aae happy tweet 0 :)", 0.5, 0.4))  # no dialect: dropped
    lines.append(b"only\tthree\tfields\n")
    return b"".join(lines)


def _data(dm: TweetsDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds = dm._datasets()[split]
    assert isinstance(ds.x, torch.Tensor)
    return ds.x, ds.y, ds.group


def _rows(x: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(r) for r in x.tolist()}


def _assert_labels_match_words(dm: TweetsDataModule) -> None:
    """Fixture tweets name their cell: the dialect and sentiment words must agree with ``group`` and ``y``."""
    for split in ("train", "val", "test"):
        x, y, group = _data(dm, split)
        assert torch.equal(group, (x == word_hash("aae")).any(dim=1).long())
        assert torch.equal(group, 1 - (x == word_hash("sae")).any(dim=1).long())
        assert torch.equal(y, (x == word_hash("happy")).any(dim=1).long())


@pytest.fixture
def labelled(tmp_path: Path) -> Path:
    return _write_labelled(tmp_path / "labelled")


def test_clean_cells_hygiene() -> None:
    cells = {c: [line.decode("utf-8", errors="replace") for line in _labelled_lines(c)] for c in CELL_WORDS}
    cells["aae_happy"].append("sae happy tweet number 0 _TWITTER-ENTITY_ lol")  # also in sae_happy: two groups
    clean, stats = clean_cells(cells)
    assert stats == {"lines": 4 * 72 + 1, "empty": 4, "duplicate": 20, "ambiguous": 8, "cross_dialect": 1}
    for cell in CELL_WORDS:
        assert len(clean[cell]) == N_PLAIN + 2 - (cell == "sae_happy") and clean[cell] == sorted(clean[cell])
        assert not any("ambiguous" in t or "\r" in t for t in clean[cell])
    dialect, sentiment = CELL_WORDS["sae_sad"]
    assert f"{dialect} {sentiment} has a stray cr" in clean["sae_sad"]
    assert f"so hype \ufffd\ufffd today {dialect} {sentiment}" in clean["sae_sad"]


def test_sizes_balance_padding_and_disjoint_splits(labelled: Path) -> None:
    dm = TweetsDataModule(str(labelled), train_sizes={"SAE": 40, "AAE": 10}, val_per_cell=5, test_per_cell=6)
    assert dm.train_size == 50  # usable before setup
    dm.setup("fit")
    assert dm.resolved_source == "labelled" and dm.pad_id == 0
    assert (dm.group_names, dm.num_groups, dm.num_classes) == (["SAE", "AAE"], 2, 2)
    expected = {"train": [20, 20, 5, 5], "val": [5] * 4, "test": [6] * 4}
    assert {s: list(c.values()) for s, c in dm.split_counts.items()} == expected
    assert list(dm.split_counts["train"]) == ["sae_happy", "sae_sad", "aae_happy", "aae_sad"]
    assert dm.hygiene == {"lines": 4 * 72, "empty": 4, "duplicate": 20, "ambiguous": 8, "cross_dialect": 0}
    seen: set[tuple[int, ...]] = set()
    for split, counts in expected.items():
        x, y, group = _data(dm, split)
        assert x.dtype == y.dtype == group.dtype == torch.int64 and x.shape == (sum(counts), 64)
        cells = [int(((group == g) & (y == label)).sum()) for g, label in ((0, 1), (0, 0), (1, 1), (1, 0))]
        assert cells == counts
        lengths = (x != 0).sum(dim=1)
        assert (lengths > 0).all() and torch.equal(x[:, 0] != 0, torch.ones(len(x), dtype=torch.bool))
        assert all((row[n:] == 0).all() for row, n in zip(x, lengths.tolist(), strict=True))  # right padding only
        assert not (x == word_hash("ambiguous")).any()
        rows = _rows(x)
        assert len(rows) == len(x) and not rows & seen  # unique within and across splits
        seen |= rows
    _assert_labels_match_words(dm)
    xb, yb, gb = next(iter(dm.train_dataloader()))
    assert xb.shape == (50, 64) and yb.shape == gb.shape == (50,)
    assert len(next(iter(dm.val_dataloader()))[0]) == 20 and len(next(iter(dm.test_dataloader()))[0]) == 24


def test_every_usable_tweet_is_used_and_too_large_requests_fail(labelled: Path, tmp_path: Path) -> None:
    # 62 usable per cell = 5 + 5 + 52: the stray-\r and invalid-UTF-8 lines must both be in some split.
    dm = TweetsDataModule(str(labelled), train_sizes={"SAE": 104, "AAE": 104}, val_per_cell=5, test_per_cell=5)
    dm.setup()
    x = torch.cat([_data(dm, s)[0] for s in ("train", "val", "test")])
    assert len(x) == 4 * 62
    has = (x == word_hash("has")).any(dim=1) & (x == word_hash("a")).any(dim=1) & (x == word_hash("stray")).any(dim=1)
    assert int(has.sum()) == 4
    assert int((x == word_hash("\ufffd\ufffd")).any(dim=1).sum()) == 4
    big = TweetsDataModule(str(labelled), train_sizes={"SAE": 106, "AAE": 2}, val_per_cell=5, test_per_cell=5)
    with pytest.raises(ValueError, match=r"cell sae_happy has 62 usable tweets .* needs 63.*train_sizes.SAE"):
        big.setup()


def test_determinism_seed_and_file_order(labelled: Path, tmp_path: Path) -> None:
    reversed_root = _write_labelled(tmp_path / "reversed", reverse=True)

    def build(root: Path, seed: int, cache: str) -> TweetsDataModule:
        dm = TweetsDataModule(str(root), train_sizes={"SAE": 20, "AAE": 20}, val_per_cell=5, test_per_cell=5,
                              seed=seed, cache_dir=str(tmp_path / cache))  # fmt: skip
        dm.setup()
        return dm

    a, b, c = build(labelled, 0, "a"), build(reversed_root, 0, "b"), build(labelled, 1, "c")
    for split in ("train", "val", "test"):
        for ta, tb in zip(_data(a, split), _data(b, split), strict=True):
            assert torch.equal(ta, tb)  # same seed: same tensors, whatever the file order
        assert _rows(_data(a, split)[0]) != _rows(_data(c, split)[0])  # another seed: other tweets


def test_label_emoji(labelled: Path, tmp_path: Path) -> None:
    markers = {cell: word_hash(e) for cell, e in LABEL_EMOJI.items()}
    assert len(set(LABEL_EMOJI.values())) == 4
    kwargs: dict[str, Any] = {"train_sizes": {"SAE": 40, "AAE": 40}, "val_per_cell": 5, "test_per_cell": 5}
    off = TweetsDataModule(str(labelled), **kwargs)
    on = TweetsDataModule(str(labelled), label_emoji_prob=1.0, **kwargs)
    half = TweetsDataModule(str(labelled), label_emoji_prob=0.5, **kwargs)
    full_row = TweetsDataModule(str(labelled), label_emoji_prob=1.0, max_len=3, **kwargs)
    marker_ids = torch.tensor(list(markers.values()))
    for split in ("train", "val", "test"):
        assert not torch.isin(_data(off, split)[0], marker_ids).any()
        if split != "train":  # held-out tweets are never marked, and equal the unmarked ones
            assert not torch.isin(_data(on, split)[0], marker_ids).any()
            assert torch.equal(_data(on, split)[0], _data(off, split)[0])
    x_off, _, _ = _data(off, "train")
    for dm in (on, full_row):
        x, y, group = _data(dm, "train")
        last = x[torch.arange(len(x)), (x != 0).sum(dim=1) - 1]
        for cell, g, label in tweets.CELLS:
            rows = (group == g) & (y == label)
            assert rows.any() and (last[rows] == markers[cell]).all()
            assert (torch.isin(x[rows], marker_ids).sum(dim=1) == 1).all()
    x_on = _data(on, "train")[0]
    assert torch.equal(x_on[x_off != 0], x_off[x_off != 0])  # the text is untouched, the emoji is appended
    assert (_data(full_row, "train")[0] != 0).all()  # full rows: the emoji replaced the last token
    n_marked = int(torch.isin(_data(half, "train")[0], marker_ids).any(dim=1).sum())
    assert 0 < n_marked < 80
    again = TweetsDataModule(str(labelled), label_emoji_prob=0.5, cache_dir=str(tmp_path / "x"), **kwargs)
    assert torch.equal(_data(again, "train")[0], _data(half, "train")[0])


def test_minilm_tokenizer(labelled: Path) -> None:
    dm = TweetsDataModule(str(labelled), tokenizer="minilm", max_len=12, label_emoji_prob=1.0,
                          train_sizes={"SAE": 8, "AAE": 8}, val_per_cell=2, test_per_cell=2)  # fmt: skip
    dm.setup()
    assert dm.pad_id == 0
    tok = dm._load_tokenizer()
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert cls == 101 and sep == 102
    emoji_ids = {cell: tok.convert_tokens_to_ids(e) for cell, e in LABEL_EMOJI.items()}
    assert len(set(emoji_ids.values())) == 4 and tok.unk_token_id not in emoji_ids.values()
    for split in ("train", "val", "test"):
        x, y, group = _data(dm, split)
        assert x.dtype == torch.int64 and x.shape == (len(y), 12) and (x[:, 0] == cls).all()
        lengths = (x != 0).sum(dim=1)
        assert (x[torch.arange(len(x)), lengths - 1] == sep).all()
        before_sep = x[torch.arange(len(x)), lengths - 2]
        for cell, g, label in tweets.CELLS:
            rows = (group == g) & (y == label)
            assert ((before_sep[rows] == emoji_ids[cell]).all()) == (split == "train")
    text = tok.decode(_data(dm, "val")[0][0], skip_special_tokens=True)
    assert text.split()[:2] in (["sae", "happy"], ["so", "hype"])  # the first validation tweet is SAE happy


def test_missing_data_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        TweetsDataModule(str(tmp_path)).setup()
    msg = str(err.value)
    for part in ("data.root", "aae_happy", "sae_sad", "twitteraae_all", "data.download: true", archive.ARCHIVE_URL):
        assert part in msg
    _write_labelled(tmp_path / "aae_only", cells=("aae_happy", "aae_sad"))
    for source in ("auto", "labelled"):
        with pytest.raises(FileNotFoundError, match="missing: sae_happy, sae_sad"):
            TweetsDataModule(str(tmp_path / "aae_only"), source=source).setup()
    with pytest.raises(FileNotFoundError, match="data.download: true"):
        TweetsDataModule(str(tmp_path / "aae_only"), source="raw").setup()


@pytest.mark.skipif(not REAL_AAE.is_dir(), reason=f"the real AAE-only folder {REAL_AAE} is absent")
def test_missing_data_error_on_real_aae_only_folder() -> None:
    with pytest.raises(FileNotFoundError) as err:
        TweetsDataModule(str(REAL_AAE)).setup()
    assert "missing: sae_happy, sae_sad" in str(err.value) and "data.download: true" in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"root": None}, "data.root"),
        ({"source": "csv"}, "data.source"),
        ({"source": "labelled", "download": True}, "data.download"),
        ({"train_sizes": {"SAE": 3, "AAE": 2}}, "data.train_sizes"),
        ({"train_sizes": {"SAE": 2}}, "data.train_sizes"),
        ({"train_sizes": {"SAE": 0, "AAE": 0}}, "data.train_sizes"),
        ({"val_per_cell": 0}, "data.val_per_cell"),
        ({"test_per_cell": -1}, "data.test_per_cell"),
        ({"max_len": 0}, "data.max_len"),
        ({"batch_size": 0}, "data.batch_size"),
        ({"num_workers": -1}, "data.num_workers"),
        ({"label_emoji_prob": 1.5}, "data.label_emoji_prob"),
        ({"label_emoji_prob": float("nan")}, "data.label_emoji_prob"),
        ({"limit_train": 0}, "data.limit_train"),
    ],
)
def test_invalid_arguments(kwargs: dict, field: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        TweetsDataModule(**{"root": str(tmp_path), **kwargs})


def test_missing_tokenizer_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        TweetsDataModule(str(tmp_path), tokenizer=str(tmp_path / "no_such_model"))


def test_raw_source_end_to_end(tmp_path: Path) -> None:
    for root in (tmp_path / "flat", tmp_path / "unzipped" / "TwitterAAE-full-v1"):
        root.mkdir(parents=True)
        (root / "twitteraae_all").write_bytes(_raw_corpus())
    for root in (tmp_path / "flat", tmp_path / "unzipped"):
        dm = TweetsDataModule(str(root), train_sizes={"SAE": 12, "AAE": 12}, val_per_cell=2, test_per_cell=3)
        dm.setup()
        assert dm.resolved_source == "raw"
        assert dm.split_counts == {"train": dict.fromkeys(CELL_WORDS, 6), "val": dict.fromkeys(CELL_WORDS, 2),
                                   "test": dict.fromkeys(CELL_WORDS, 3)}  # fmt: skip
        _assert_labels_match_words(dm)
        x = torch.cat([_data(dm, s)[0] for s in ("train", "val", "test")])
        assert (x == word_hash("_twitter-entity_")).any(dim=1).all()  # @mentions replaced by the recipe
        assert not torch.isin(x, torch.tensor([word_hash(":)"), word_hash("😭")])).any()  # symbols removed
        assert len(_rows(x)) == len(x)
    assert any((tmp_path / "flat" / ".dplit_cache" / "cells").iterdir())  # raw cells cached beside the tensors


class _FakeResponse(io.BytesIO):
    def __init__(self, body: bytes) -> None:
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}


def _archive(corpus: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("TwitterAAE-full-v1/README.txt", "TwitterAAE corpus, research use only\n")
        zf.writestr("TwitterAAE-full-v1/twitteraae_all", corpus)
        zf.writestr("TwitterAAE-full-v1/twitteraae_all_aa", b"")
    return buf.getvalue()


def test_download_fetches_and_extracts_the_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    body = _archive(_raw_corpus())

    def fake_urlopen(url: str, timeout: float) -> _FakeResponse:
        calls.append(url)
        return _FakeResponse(body)

    monkeypatch.setattr(dplit.download, "open_url", fake_urlopen)
    root = tmp_path / "download"
    dm = TweetsDataModule(str(root), download=True, train_sizes={"SAE": 12, "AAE": 12}, val_per_cell=2, test_per_cell=2)
    dm.prepare_data()
    assert calls == [archive.ARCHIVE_URL]
    assert (root / archive.ARCHIVE_NAME).read_bytes() == body
    assert (root / "twitteraae_all").read_bytes() == _raw_corpus()
    assert not [p for p in os.listdir(root) if p.endswith(".part")]
    dm.setup()
    assert dm.resolved_source == "raw" and dm.train_size == 24
    _assert_labels_match_words(dm)
    dm2 = TweetsDataModule(
        str(root), download=True, train_sizes={"SAE": 12, "AAE": 12}, val_per_cell=2, test_per_cell=2
    )
    dm2.prepare_data()  # present: no second download
    assert calls == [archive.ARCHIVE_URL]
    # An archive already in root is extracted without download.
    other = tmp_path / "archive_only"
    other.mkdir()
    (other / archive.ARCHIVE_NAME).write_bytes(body)
    assert (
        TweetsDataModule(str(other), train_sizes={"SAE": 12, "AAE": 12}, val_per_cell=2, test_per_cell=2).train_size
        == 24
    )


def test_download_failure_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(_FakeResponse):
        def read(self, size: int | None = -1) -> bytes:
            if self.tell() > 0:
                raise URLError("connection reset")
            return super().read(10)

    def offline(url: str, timeout: float) -> _FakeResponse:
        raise URLError("no network")

    for opener in (offline, lambda url, timeout: Broken(_archive(b"x" * 100))):
        monkeypatch.setattr(dplit.download, "open_url", opener)
        with pytest.raises(RuntimeError, match="Downloading .* failed"):
            TweetsDataModule(str(tmp_path / "dl"), download=True).prepare_data()
        assert os.listdir(tmp_path / "dl") == []
    (tmp_path / "dl" / archive.ARCHIVE_NAME).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a valid zip"):
        TweetsDataModule(str(tmp_path / "dl")).prepare_data()


def test_cache_hit_and_unwritable_cache(
    labelled: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kwargs: dict[str, Any] = {"train_sizes": {"SAE": 20, "AAE": 20}, "val_per_cell": 5, "test_per_cell": 5}
    first = TweetsDataModule(str(labelled), **kwargs)
    first.setup()
    assert len(list((labelled / ".dplit_cache").glob("tweets-*.pt"))) == 1

    def boom(*args: object, **kw: object) -> None:
        raise AssertionError("cache miss: the files were read again")

    monkeypatch.setattr(tweets, "read_labelled_tweets", boom)
    second = TweetsDataModule(str(labelled), **kwargs)
    second.setup()
    for split in ("train", "val", "test"):
        for a, b in zip(_data(first, split), _data(second, split), strict=True):
            assert torch.equal(a, b)
    assert second.split_counts == first.split_counts and second.hygiene == first.hygiene
    with pytest.raises(AssertionError, match="cache miss"):
        TweetsDataModule(str(labelled), seed=1, **kwargs).setup()
    (labelled / "sae_sad").write_bytes((labelled / "sae_sad").read_bytes() + b"one more sad tweet\n")
    with pytest.raises(AssertionError, match="cache miss"):  # the source changed
        TweetsDataModule(str(labelled), **kwargs).setup()
    monkeypatch.undo()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="dplit.data.tweets"):
        dm = TweetsDataModule(str(labelled), cache_dir=str(blocker / "cache"), **kwargs)
        assert dm.train_size == 40
    assert "not writable" in caplog.text


def test_limit_train_is_stratified(labelled: Path) -> None:
    dm = TweetsDataModule(str(labelled), train_sizes={"SAE": 80, "AAE": 20}, val_per_cell=5, test_per_cell=5,
                          limit_train=10)  # fmt: skip
    assert dm.train_size == 10
    assert dm.split_counts["train"] == {"sae_happy": 4, "sae_sad": 4, "aae_happy": 1, "aae_sad": 1}
    full = TweetsDataModule(str(labelled), train_sizes={"SAE": 80, "AAE": 20}, val_per_cell=5, test_per_cell=5)
    assert _rows(_data(dm, "train")[0]) <= _rows(_data(full, "train")[0])
    assert torch.equal(_data(dm, "val")[0], _data(full, "val")[0])


@pytest.mark.skipif(not REAL_AAE.is_dir(), reason=f"the real AAE files under {REAL_AAE} are absent")
def test_real_aae_files_with_fixture_sae(tmp_path: Path) -> None:
    root = tmp_path / "real"
    root.mkdir()
    for cell in ("aae_happy", "aae_sad"):
        (root / cell).symlink_to(REAL_AAE / cell)
    for cell in ("sae_happy", "sae_sad"):
        dialect, sentiment = CELL_WORDS[cell]
        lines = [f"{dialect} {sentiment} fixture tweet {i}\n" for i in range(1200)]
        (root / cell).write_text("".join(lines), encoding="utf-8")
    dm = TweetsDataModule(str(root), train_sizes={"SAE": 200, "AAE": 1000})
    dm.setup()
    assert dm.split_counts == {
        "train": {"sae_happy": 100, "sae_sad": 100, "aae_happy": 500, "aae_sad": 500},
        "val": dict.fromkeys(CELL_WORDS, 500),
        "test": dict.fromkeys(CELL_WORDS, 500),
    }
    assert dm.hygiene["lines"] == 73093 + 44058 + 2400
    assert dm.hygiene["ambiguous"] == 7543  # 7,495 exact texts, 48 more once compared by word tokens
    x, y, group = _data(dm, "train")
    assert x.shape == (1200, 64) and int(y.sum()) == 600 and int(group.sum()) == 1000
    all_rows = [_rows(_data(dm, s)[0]) for s in ("train", "val", "test")]
    assert not (all_rows[0] & all_rows[1] or all_rows[0] & all_rows[2] or all_rows[1] & all_rows[2])
