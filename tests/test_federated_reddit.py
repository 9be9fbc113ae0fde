"""LEAF Reddit as a federated next-word task: samples from LEAF's JSON, the vocabulary rules, the tied model."""

from __future__ import annotations

import pytest
import torch
from federated_fixtures import REDDIT_WORDS, write_reddit

from dplit.federated.config import DataConfig, FederatedConfigError, parse_config
from dplit.federated.data import load_data
from dplit.federated.evaluation import evaluate
from dplit.federated.models import WordLSTM, build_task
from dplit.federated.reddit import PAD_ID, UNK_ID, build_vocab, next_word_samples


def test_next_word_samples_left_pad_and_drop_oov_targets():
    index = {"<BOS>": 2, "a": 3, "b": 4}
    x, y = next_word_samples([["<BOS>", "a", "zzz", "b"]], index, max_len=2, stride=1)
    # targets a, (zzz: out of vocabulary, dropped), b; the OOV word stays as context (UNK_ID)
    assert y.tolist() == [3, 4]
    assert x.tolist() == [[PAD_ID, 2], [3, UNK_ID]]


def test_vocab_from_training_users_is_frequency_ordered():
    assert build_vocab([["b", "a", "b"], ["c", "a", "b"]], 2) == ["b", "a"]


def test_reddit_users_from_leaf_json_with_a_fixed_vocabulary(tmp_path):
    root = write_reddit(tmp_path / "r")
    cfg = DataConfig(dataset="reddit", root=str(root), vocab_file=str(root / "vocab.txt"), vocab_size=100,
                     min_samples=2, eval_fraction=0.25, max_len=3, vocab_bins=[7])  # fmt: skip
    data = load_data(cfg)
    assert data.num_classes == 2 + 2 + len(REDDIT_WORDS) - 1  # pad, unk, <BOS>, <EOS>, the listed words
    assert [u.name for u in data.users] == [f"redditor{u}" for u in range(4)]
    oov = 2 + 2 + len(REDDIT_WORDS) - 1
    for u in data.users:
        assert u.x_train.shape[1] == 3 and len(u.y_train) == len(u.x_train)
        assert bool((u.y_train >= 2).all()) and bool((u.y_train < oov).all())  # never pad/unk targets
    # vocabulary size = distinct words (not <BOS>/<EOS>) of the training comments; user u uses 5 + 2u words
    assert data.users[0].vocab == 5 and data.users[3].vocab > data.users[0].vocab
    assert data.user_bucket["vocab"][0] == 0 and data.user_bucket["vocab"][3] == 1
    # the held-out comments are the user's last ones: the first training sample is the first comment's first word
    assert data.users[0].y_train[0].item() == 2 + 2 + 0  # REDDIT_WORDS[0] after <BOS>, <EOS>


def test_dp_reddit_without_a_public_vocabulary_is_refused(tmp_path):
    raw = {"data": {"dataset": "reddit", "root": str(tmp_path)}, "privacy": {"clip": 1.0, "noise_multiplier": 1.0}}
    with pytest.raises(FederatedConfigError, match="data.vocab_file"):
        parse_config(raw)
    raw["privacy"] = None
    assert parse_config(raw).data.vocab_file is None  # non-DP may build it from the training users
    with pytest.raises(FederatedConfigError, match="data.vocab_file .* not found"):
        load_data(DataConfig(dataset="reddit", root=str(write_reddit(tmp_path / "r")), vocab_file="nope.txt"))


def test_word_lstm_ties_embedding_and_decoder_and_metrics_count_output_vocab(tmp_path):
    model = WordLSTM(12, embedding_dim=4, hidden_size=6, num_layers=2)
    logits = model(torch.randint(0, 12, (3, 5)))
    assert logits.shape == (3, 12)
    names = {n for n, _ in model.named_parameters()}
    assert "embedding.weight" in names and not any(n.startswith("head") for n in names)
    model.embedding.weight.grad = None
    logits.sum().backward()
    assert model.embedding.weight.grad is not None  # also the decoder's weight
    root = write_reddit(tmp_path / "r")
    raw = {"data": {"dataset": "reddit", "root": str(root), "vocab_file": None, "max_len": 3, "vocab_bins": [7]},
           "model": {"hidden_size": 8, "embedding_dim": 8, "num_layers": 2}}  # fmt: skip
    cfg = parse_config(raw)
    data = load_data(cfg.data)
    task = build_task(cfg, data.num_classes)
    metrics = evaluate(task, data, "vocab")
    preds = torch.cat([task(u.x_eval).argmax(-1) for u in data.users])
    assert metrics["val/output_vocab"] == len(set(preds.tolist()))
    assert "val/acc/group=<7" in metrics and "val/acc/group=>=7" in metrics


@pytest.mark.parametrize("mode", ["hooks", "ghost", "bookkeeping"])
def test_char_lstm_is_covered_by_dplit_per_example_rules(mode):
    """Local (example-level) DP inside a client would clip with dplit's rules: every trainable parameter of the
    Shakespeare model has one (the LSTM's einsum rule, Embedding, Linear); functorch refuses dplit's LSTM by name."""
    from dplit.federated.models import CharLSTM
    from dplit.privacy.coverage import uncovered

    assert uncovered(CharLSTM(num_chars=20), mode) == []


def test_word_lstm_tied_decoder_is_refused_by_the_outside_use_guard():
    """WordLSTM's decoder reads embedding.weight in WordLSTM's own forward (not in a layer that owns it): under local
    DP that use would escape every per-example rule, so the DP callback's guard refuses it by name."""
    from torch import nn

    from dplit.privacy.coverage import UncoveredParameterError
    from dplit.privacy.use_guard import OutsideUseGuard

    class Step(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = WordLSTM(vocab=30, embedding_dim=8, hidden_size=8, num_layers=1)

        def training_step(self, ids):
            return self.net(ids).sum()

    step = Step()
    guard = OutsideUseGuard(step)
    with pytest.raises(UncoveredParameterError, match=r"net\.embedding\.weight \(owned by net\.embedding\)"):
        step.training_step(torch.randint(0, 30, (2, 5)))
    guard.remove()
    assert step.training_step(torch.randint(0, 30, (2, 5))).requires_grad  # the task's own method again
