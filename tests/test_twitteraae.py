"""TwitterAAE dialect model and labelled-tweet reader: tiny fixtures in the real formats, plus the real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dplit.data.twitteraae import MENTION_TOKEN, DialectModel, read_labelled_tweets, tokenize

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "twitteraae"
REAL_MODEL = SHARED / "model"
REAL_SENTIMENT = SHARED / "aae_sentiment"

# Columns: AA, Hispanic, Asian, White.
TINY = {
    "finna": (900.0, 20.0, 10.0, 30.0),
    "bruh": (800.0, 30.0, 10.0, 40.0),
    "wit": (700.0, 50.0, 20.0, 100.0),
    "going": (50.0, 60.0, 40.0, 900.0),
    "brother": (40.0, 50.0, 30.0, 800.0),
    "the": (500.0, 500.0, 500.0, 500.0),
}


def _write_model(root: Path, rows: dict[str, tuple[float, ...]] = TINY) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    table = "".join("\t".join(f"{c:.2f}" for c in counts) + "\n" for counts in rows.values())
    vocab = "".join(f"{int(sum(counts))}\t{word}\n" for word, counts in rows.items())
    (root / "model_count_table.txt").write_text(table, encoding="ascii")
    (root / "model_vocab.txt").write_text(vocab, encoding="utf-8")
    return root


@pytest.fixture
def tiny_model(tmp_path: Path) -> DialectModel:
    return DialectModel.load(_write_model(tmp_path / "model"))


def test_tiny_model_loads_like_loadtxt(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "model")
    model = DialectModel.load(root)
    expected = np.loadtxt(root / "model_count_table.txt")
    np.testing.assert_array_equal(model.counts, expected)
    np.testing.assert_allclose(model.word_probs, (expected + 1) / expected.sum(axis=0))
    assert model.vocab == list(TINY)


def test_tiny_model_predicts_skewed_posteriors(tiny_model: DialectModel) -> None:
    aa = tiny_model.predict(["Finna", "bruh", "WIT", "the"])
    white = tiny_model.predict(["going", "brother", "the"])
    assert aa is not None and white is not None
    for post in (aa, white):
        assert post.shape == (4,)
        assert post.sum() == pytest.approx(1.0)
        assert (post > 0).all()
    assert int(np.argmax(aa)) == 0 and int(np.argmax(white)) == 3
    assert aa[0] > white[0]


def test_single_token_posterior_is_normalised_word_probs(tiny_model: DialectModel) -> None:
    # With one token the leave-one-out counts are zero, so every pass returns the normalised likelihood.
    post = tiny_model.predict(["bruh"])
    probs = tiny_model.word_probs[tiny_model.index["bruh"]]
    np.testing.assert_allclose(post, probs / probs.sum())


def test_unknown_tokens_give_none(tiny_model: DialectModel) -> None:
    assert tiny_model.predict(["zzz", "qqq"]) is None
    assert tiny_model.predict([]) is None
    # As the reference: fewer than 20% of tokens in the vocabulary -> None, unless min_fraction is lowered.
    sparse = ["bruh"] + [f"oov{i}" for i in range(9)]
    assert tiny_model.predict(sparse) is None
    assert tiny_model.predict(sparse, min_fraction=0.0) is not None


def test_tokenize() -> None:
    assert tokenize("Yo @Bob check https://t.co/x  www.a.com WIT it") == ["yo", MENTION_TOKEN, "check", "wit", "it"]


def test_model_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model_count_table.txt.*model_vocab.txt|slanglab/twitteraae"):
        DialectModel.load(tmp_path / "nowhere")
    root = _write_model(tmp_path / "half")
    (root / "model_vocab.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        DialectModel.load(root)
    msg = str(err.value)
    assert "model_vocab.txt" in msg and "model_count_table.txt" in msg and "slanglab/twitteraae" in msg


def test_model_misaligned_files(tmp_path: Path) -> None:
    root = _write_model(tmp_path / "model")
    with open(root / "model_vocab.txt", "a", encoding="utf-8") as f:
        f.write("1\textra\n")
    with pytest.raises(ValueError, match="vocabulary"):
        DialectModel.load(root)


@pytest.mark.skipif(not REAL_MODEL.is_dir(), reason=f"real TwitterAAE model not found at {REAL_MODEL}")
def test_real_model_separates_aae_from_sae() -> None:
    model = DialectModel.load(REAL_MODEL)
    assert model.counts.shape == (191_874, 4)
    aae = model.predict(tokenize("finna go to the sto wit my bruh"))
    sae = model.predict(tokenize("I am going to the store with my brother"))
    assert aae is not None and sae is not None
    assert aae.sum() == pytest.approx(1.0) and sae.sum() == pytest.approx(1.0)
    assert aae[0] > 0.5 > sae[0]


def _write_tweets(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def test_reader_keeps_stray_cr_and_replaces_invalid_utf8(tmp_path: Path) -> None:
    happy = [b"so happy wit it", b"bad \\ud83d \xed\xa0\xbd bytes", b"stray\rreturn inside", b""]
    sad = [b"i'm sad _TWITTER-ENTITY_", "caf\u00e9".encode()]
    _write_tweets(tmp_path / "aae_happy", happy)
    _write_tweets(tmp_path / "aae_sad", sad)
    out = read_labelled_tweets(tmp_path)
    assert set(out) == {"aae_happy", "aae_sad"}
    assert len(out["aae_happy"]) == 4 and len(out["aae_sad"]) == 2
    assert out["aae_happy"][2] == "stray\rreturn inside"
    assert "\ufffd" in out["aae_happy"][1]
    assert out["aae_happy"][3] == ""
    assert out["aae_sad"][1] == "caf\u00e9"
    _write_tweets(tmp_path / "sae_happy", [b"standard"])
    assert read_labelled_tweets(tmp_path)["sae_happy"] == ["standard"]


def test_reader_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_labelled_tweets(tmp_path / "nowhere")
    _write_tweets(tmp_path / "aae_happy", [b"x"])
    with pytest.raises(FileNotFoundError, match="aae_sad.*twitteraae-sentiment-data"):
        read_labelled_tweets(tmp_path)


@pytest.mark.skipif(
    not REAL_SENTIMENT.is_dir(), reason=f"real TwitterAAE sentiment files not found at {REAL_SENTIMENT}"
)
def test_real_sentiment_counts() -> None:
    out = read_labelled_tweets(REAL_SENTIMENT)
    assert len(out["aae_happy"]) == 73_093
    assert len(out["aae_sad"]) == 44_058
    assert sum("\r" in t for t in out["aae_happy"]) == 1
    assert sum("\r" in t for t in out["aae_sad"]) == 1
