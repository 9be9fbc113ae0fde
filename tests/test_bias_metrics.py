"""Bias metrics against hand computations: StereoSet SS/LMS/ICAT, CrowS-Pairs, perplexity gap, sentence scores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from test_lm_corpus import build_tokenizer

from dplit.data.bias_benchmarks import CrowsPair, StereoSetItem
from dplit.metrics.bias import (
    crows_pairs_scores,
    evaluate_crows_pairs,
    evaluate_perplexity_gap,
    evaluate_stereoset,
    sentence_logprobs,
    stereoset_scores,
)
from dplit.models.causal_lm import CausalLM, load_tokenizer
from dplit.text.cda import WordSwapper

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    tokenizer = load_tokenizer(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))
    model = CausalLM(config={**LLAMA, "vocab_size": len(tokenizer)}, init_seed=1).eval()
    return model, tokenizer


def _item(target: str, domain: str) -> StereoSetItem:
    return StereoSetItem("i", target, domain, "ctx", "the man is a king .", "the woman is a king .", "the a the of .")


def test_stereoset_scores_by_hand():
    items = [_item("nurse", "profession"), _item("nurse", "profession"), _item("chef", "profession"),
             _item("mother", "gender")]  # fmt: skip
    stereo, anti, unrelated = [-1.0, -3.0, -1.0, -2.0], [-2.0, -1.0, -2.0, -1.0], [-5.0, -2.0, 0.0, -3.0]
    scores = stereoset_scores(items, stereo, anti, unrelated)
    # nurse: pro 1/2 -> SS 50; related: (1+1) + (0+1) = 3 of 4 -> LMS 75. chef: SS 100; related 0 of 2 -> LMS 0.
    prof = scores["profession"]
    assert prof["ss"] == pytest.approx((50 + 100) / 2) and prof["lms"] == pytest.approx((75 + 0) / 2)
    assert prof["icat"] == pytest.approx(37.5 * min(75, 25) / 50) and prof["count"] == 3
    # mother: pro 0 -> SS 0; related 2 of 2 -> LMS 100; ICAT 100 * 0 / 50 = 0
    assert scores["gender"] == {"ss": 0.0, "lms": 100.0, "icat": 0.0, "count": 1.0}
    # overall: targets nurse, chef, mother averaged
    assert scores["overall"]["ss"] == pytest.approx(50.0) and scores["overall"]["lms"] == pytest.approx(175 / 3)
    assert scores["overall"]["icat"] == pytest.approx(175 / 3)


def test_crows_pairs_scores_by_hand():
    pairs = [CrowsPair("a", "b", "stereo", "gender"), CrowsPair("a", "b", "antistereo", "gender"),
             CrowsPair("a", "b", "stereo", "race-color")]  # fmt: skip
    scores = crows_pairs_scores(pairs, more=[-1.0, -5.0, -2.0], less=[-2.0, -4.0, -1.0])
    assert scores == {"overall": pytest.approx(100 / 3), "gender": 50.0, "race-color": 0.0}


def _by_hand(model: CausalLM, tokenizer, text: str) -> tuple[float, int]:
    """One sentence, no padding, no batching: sum of log p(token | start, earlier tokens)."""
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logp = model(torch.tensor([ids]))[0].log_softmax(-1)
    return sum(float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)), len(ids) - 1


def test_sentence_logprobs_match_one_sentence_at_a_time(lm):
    model, tokenizer = lm
    texts = ["the man is a king .", "she", "his wife was an actress known for her role in the film ."]
    total, count = sentence_logprobs(model, tokenizer, texts, batch_size=2)  # padded batches
    for i, text in enumerate(texts):
        expected, n = _by_hand(model, tokenizer, text)
        assert int(count[i]) == n and float(total[i]) == pytest.approx(expected, rel=1e-5)


def test_evaluate_stereoset_crows_and_perplexity_gap_by_hand(lm, tmp_path: Path):
    model, tokenizer = lm
    items = [StereoSetItem("1", "actor", "gender", "c", "the man is a king .", "the woman is a king .", "of of ."),
             StereoSetItem("2", "actor", "gender", "c", "he was born in the city .", "she was born in the city .",
                           "city the was .")]  # fmt: skip

    def mean(text: str) -> float:
        total, n = _by_hand(model, tokenizer, text)
        return total / n

    expected = stereoset_scores(items, [mean(i.stereotype) for i in items], [mean(i.anti_stereotype) for i in items],
                                [mean(i.unrelated) for i in items])  # fmt: skip
    assert evaluate_stereoset(model, tokenizer, items) == expected
    pairs = [CrowsPair("the man is a king .", "the woman is a king .", "stereo", "gender"),
             CrowsPair("she sang .", "he sang .", "antistereo", "gender")]  # fmt: skip
    wins = [float(_by_hand(model, tokenizer, p.sent_more)[0] > _by_hand(model, tokenizer, p.sent_less)[0])
            for p in pairs]  # fmt: skip
    assert evaluate_crows_pairs(model, tokenizer, pairs) == {"overall": 50.0 * sum(wins), "gender": 50.0 * sum(wins)}
    (tmp_path / "pairs.txt").write_text("king\tqueen\nactor\tactress\n")
    swapper = WordSwapper([tmp_path / "pairs.txt"])
    sentences = ["he is a king .", "the city was old .", "her son is an actor ."]
    gap = evaluate_perplexity_gap(model, tokenizer, sentences, swapper.swap)
    changed = ["he is a king .", "her son is an actor ."]  # the city sentence has nothing to swap
    swapped = ["she is a queen .", "his son is an actress ."]
    o = [_by_hand(model, tokenizer, s) for s in changed]
    c = [_by_hand(model, tokenizer, s) for s in swapped]
    ppl_o = math.exp(-sum(t for t, _ in o) / sum(n for _, n in o))
    ppl_c = math.exp(-sum(t for t, _ in c) / sum(n for _, n in c))
    assert gap["count"] == 2 and gap["ppl_original"] == pytest.approx(ppl_o, rel=1e-5)
    assert gap["gap"] == pytest.approx(ppl_c - ppl_o, rel=1e-4)
