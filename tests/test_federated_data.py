"""Federated data: LEAF JSON reader (real format, clear errors), the Shakespeare (play, role) split, buckets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from federated_fixtures import leaf_doc, write_sent140, write_shakespeare

from dplit.federated.config import DataConfig, FederatedConfigError
from dplit.federated.data import bin_index, bin_names, load_data
from dplit.federated.leaf import LeafFormatError, read_leaf, read_leaf_file, reddit_tokens, sent140_texts
from dplit.federated.shakespeare import ALL_LETTERS, build_roles, encode_chars, next_char_samples, parse_roles

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(tmp_path: Path, doc: object, name: str = "f.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def test_leaf_reader_reads_users_in_order_and_merges_files(tmp_path):
    root = write_sent140(tmp_path / "s", num_users=3, samples=(4, 6, 8))
    users = read_leaf(root)
    assert [u.name for u in users] == ["user0", "user1", "user2"]
    assert [len(u.y) for u in users] == [4, 6, 8]
    texts, labels = sent140_texts(users[1])
    assert texts[0].startswith("@friend1 ") and set(labels) == {0, 1}
    # a second file with more rows for user0 is concatenated
    extra = leaf_doc(users=["user0"], num_samples=[2], user_data={"user0": leaf_doc()["user_data"]["a"]})
    _write(root / "data" / "test", extra, "more.json")
    assert len({u.name: u for u in read_leaf(root)}["user0"].y) == 6


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        (leaf_doc(users=None), "missing key 'users'"),
        (leaf_doc(num_samples=None), "missing key 'num_samples'"),
        (leaf_doc(user_data=None), "missing key 'user_data'"),
        (leaf_doc(user_data={}), "user 'a' is listed in 'users' but missing from 'user_data'"),
        (leaf_doc(user_data={"a": {"x": []}}), "missing key 'user_data'['a']['y']"),
        (leaf_doc(num_samples=[3]), "'num_samples' says 3"),
        ([1, 2], "JSON object"),
    ],
)
def test_leaf_reader_names_file_and_key(tmp_path, doc, needle):
    path = _write(tmp_path, doc)
    with pytest.raises(LeafFormatError) as err:
        read_leaf_file(path)
    assert needle in str(err.value) and str(path) in str(err.value)


def test_leaf_missing_root_and_bad_rows(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        read_leaf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \*\.json"):
        read_leaf(tmp_path / "empty")
    bad = leaf_doc(user_data={"a": {"x": [["only", "three", "cols"], ["1", "d", "q", "a", "t"]], "y": [1, 0]}})
    (user,) = read_leaf_file(_write(tmp_path, bad))
    with pytest.raises(LeafFormatError, match=r"\[id, date, query, user, text"):
        sent140_texts(user, "f.json")


def test_reddit_reader_drops_padding(tmp_path):
    doc = {
        "users": ["r1"],
        "num_samples": [2],
        "user_data": {
            "r1": {
                "x": [[["<BOS>", "hello", "world", "<EOS>", "<PAD>"]], [["<BOS>", "a", "<PAD>"], ["b", "<EOS>"]]],
                "y": [{"target_tokens": [["hello"]]}, {"target_tokens": [["a"]]}],
            }
        },
    }
    (user,) = read_leaf_file(_write(tmp_path, doc))
    assert reddit_tokens(user) == [["<BOS>", "hello", "world", "<EOS>"], ["<BOS>", "a", "b", "<EOS>"]]
    doc["user_data"]["r1"]["x"][0] = "not tokens"
    (user,) = read_leaf_file(_write(tmp_path, doc))
    with pytest.raises(LeafFormatError, match="list of token lists"):
        reddit_tokens(user)


def test_shakespeare_roles_both_layouts_and_no_duplicate_play(tmp_path):
    root = write_shakespeare(tmp_path / "sh", repeat=2)
    roles = build_roles(root)
    assert sorted(roles) == ["gamma_gut_f_Del", "gamma_gut_f_Gam", "testus_gut_Alp", "testus_gut_Bet"]
    assert "And more words for the first speaker" in roles["testus_gut_Alp"]
    assert "Again I speak" in roles["testus_gut_Alp"]  # second speech of the same role appended
    assert "Enter" not in roles["testus_gut_Bet"] and "Exit" not in roles["testus_gut_Alp"]
    assert "and so it goes on the next line" in roles["gamma_gut_f_Gam"]  # Folio continuation line
    assert build_roles(root) == roles  # deterministic
    assert parse_roles("ACT I.\n\nScene I. A room.\n") == {}


def test_next_char_samples_are_leaf_windows():
    x, y = next_char_samples("abcdef", seq_len=3, stride=1)
    assert x.tolist() == [encode_chars("abc").tolist(), encode_chars("bcd").tolist(), encode_chars("cde").tolist()]
    assert y.tolist() == encode_chars("def").tolist()
    assert encode_chars("\u00e9a").tolist() == [0, ALL_LETTERS.index("a") + 1]
    assert next_char_samples("ab", 3, 1)[0].shape == (0, 3)


def test_buckets_and_split(tmp_path):
    assert bin_names([5, 10]) == ["<5", "5-9", ">=10"]
    assert [bin_index(v, [5, 10]) for v in (0, 4, 5, 9, 10, 99)] == [0, 0, 1, 1, 2, 2]
    root = write_sent140(tmp_path / "s", num_users=4, samples=(4, 6, 8, 12))
    data = load_data(DataConfig(root=str(root), size_bins=[5], vocab_bins=[10], eval_fraction=0.25))
    assert [len(u.y_train) for u in data.users] == [3, 4, 6, 9]
    assert [len(u.y_eval) for u in data.users] == [1, 2, 2, 3]
    assert data.user_bucket["size"] == [0, 0, 1, 1]
    u = data.users[0]
    assert sorted(torch.cat([u.y_train, u.y_eval]).tolist()) == [0, 0, 1, 1]  # a permutation of the user's rows
    again = load_data(DataConfig(root=str(root), size_bins=[5], vocab_bins=[10], eval_fraction=0.25))
    assert again is data  # cached per process
    other = load_data(DataConfig(root=str(root), size_bins=[5], vocab_bins=[10], eval_fraction=0.25, split_seed=1))
    assert [torch.equal(a.y_eval, b.y_eval) for a, b in zip(data.users, other.users, strict=True)] != [True] * 4
    assert all(u.vocab > 0 for u in data.users)


def test_shakespeare_heldout_windows_do_not_overlap_training(tmp_path):
    root = write_shakespeare(tmp_path / "sh", repeat=12)
    data = load_data(DataConfig(dataset="shakespeare", root=str(root), seq_len=10, stride=5, min_samples=4))
    for u in data.users:
        assert len(u.y_train) >= 1 and len(u.y_eval) >= 1
        # training windows end 2 windows (seq_len / stride) before the first held-out window starts
        assert len(u.y_train) + 2 + len(u.y_eval) <= len(next_char_samples(build_roles(root)[u.name], 10, 5)[1])


def test_sent140_split_is_not_the_label_order(tmp_path):
    """LEAF lists a Sent140 user's tweets sorted by label: the held-out split must not take the last (positive) ones."""
    doc = leaf_doc(users=[f"u{i}" for i in range(40)], num_samples=[8] * 40)
    doc["user_data"] = {
        f"u{i}": {"x": [["1", "d", "q", f"u{i}", f"w{j}", "t"] for j in range(8)], "y": [0] * 4 + [1] * 4}
        for i in range(40)
    }
    _write(tmp_path, doc)
    data = load_data(DataConfig(root=str(tmp_path / "f.json"), eval_fraction=0.25))
    held_out = torch.cat([u.y_eval for u in data.users]).float()
    assert 0.3 < float(held_out.mean()) < 0.7  # the ordered split would give 1.0


def test_no_usable_user_is_a_clear_error(tmp_path):
    root = write_sent140(tmp_path / "s", num_users=2, samples=(1,))
    with pytest.raises(FederatedConfigError, match="data.min_samples"):
        load_data(DataConfig(root=str(root)))


@pytest.mark.skipif(
    not (SHARED / "leaf_sent140").is_dir(), reason="../shared/data/leaf_sent140 absent (real LEAF data)"
)
def test_real_sent140_counts():
    users = read_leaf(SHARED / "leaf_sent140")
    assert len(users) == 2875 and sum(len(u.y) for u in users) == 16025
    assert sum(sum(sent140_texts(u)[1]) for u in users) == 9717  # positives, as the data README says


@pytest.mark.skipif(not (SHARED / "shakespeare").is_dir(), reason="../shared/data/shakespeare absent (Gutenberg texts)")
def test_real_shakespeare_roles():
    roles = build_roles(SHARED / "shakespeare")
    assert {"hamlet_gut_Ham", "hamlet_gut_Oph", "macbeth_gut_MACBETH", "macbeth_gut_LADY_MACBETH"} <= set(roles)
    assert not any(k.startswith("sonnets") for k in roles)
    assert "To be, or not to be" in roles["hamlet_gut_Ham"]


class _FirstTokenParity(torch.nn.Module):
    """Predicts class x[:, 0] % 2 (logits [B, 2]); has one parameter so the task can build an optimizer."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(x[:, 0] % 2, 2).float() * 5 + self.w


def test_bucket_metrics_match_a_plain_loop(tmp_path):
    from dplit.federated.data import FederatedData, UserData
    from dplit.federated.evaluation import evaluate
    from dplit.tasks.classification import ClassificationTask

    gen = torch.Generator().manual_seed(0)
    users, sizes, vocabs = [], [3, 12, 7, 20, 4], [10, 90, 50, 45, 200]
    for i, (n, v) in enumerate(zip(sizes, vocabs, strict=True)):
        x_eval = torch.randint(0, 9, (n, 4), generator=gen)
        y_eval = torch.randint(0, 2, (n,), generator=gen)
        users.append(UserData(f"u{i}", x_eval, y_eval, x_eval, y_eval, v))
    data = FederatedData(users, 2)
    for attr, edges, values in (("size", [5, 10], sizes), ("vocab", [40, 80], vocabs)):
        data.buckets[attr] = bin_names(edges)
        data.user_bucket[attr] = [bin_index(v, edges) for v in values]
    out = evaluate(ClassificationTask(_FirstTokenParity()), data, primary="vocab", batch_size=7)
    for attr, mark in (("vocab", "group"), ("size", "size")):
        accs = {}
        for b, name in enumerate(data.buckets[attr]):  # the reference: a plain loop over users and examples
            hits = [int(u.x_eval[j, 0] % 2 == u.y_eval[j]) for i, u in enumerate(users)
                    if data.user_bucket[attr][i] == b for j in range(len(u.y_eval))]  # fmt: skip
            if hits:
                accs[name] = sum(hits) / len(hits)
                assert out[f"val/acc/{mark}={name}"] == pytest.approx(accs[name])
                assert out[f"val/count/{mark}={name}"] == len(hits)
            else:
                assert f"val/acc/{mark}={name}" not in out  # a missing bucket is absent, not 0
        assert out[f"val/worst_group_acc/{attr}"] == pytest.approx(min(accs.values()))
        assert out[f"val/acc_gap/{attr}"] == pytest.approx(max(accs.values()) - min(accs.values()))
    assert out["val/worst_group_acc"] == out["val/worst_group_acc/vocab"]
    total = sum(int(u.x_eval[j, 0] % 2 == u.y_eval[j]) for u in users for j in range(len(u.y_eval)))
    assert out["val/acc"] == pytest.approx(total / sum(sizes))
