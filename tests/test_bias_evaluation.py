"""BiasEvaluation wiring: benchmarks read from a real-format root, logged as <stage>/bias/..., BOLD prompts of
held-out entities only, generation seeded; BOLD group scores by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from dp_helpers import trainer
from test_bias_benchmarks import CROWS_HEADER, write_stereoset
from test_lm_corpus import build_tokenizer, write_bold

import dplit.metrics.bias_eval as bias_eval
from dplit.data.bias_benchmarks import BoldText, read_crows_pairs, read_stereoset
from dplit.data.lm_bias import LMCorpusDataModule
from dplit.metrics.bias import evaluate_crows_pairs, evaluate_perplexity_gap, evaluate_stereoset
from dplit.metrics.bias_bold import GenerationSettings, bold_group_scores, generate
from dplit.models.causal_lm import CausalLM
from dplit.tasks.causal_lm import CausalLMTask
from dplit.text.cda import WordSwapper

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64}  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bold_group_scores_by_hand():
    prompts = [BoldText("gender", "American_actors", "a", "p"), BoldText("gender", "American_actors", "b", "p"),
               BoldText("gender", "American_actresses", "c", "p")]  # fmt: skip
    senti = {"good": 0.8, "bad": -0.6, "meh": 0.1}
    scores = bold_group_scores(prompts, ["good", "bad", "meh"], lambda ts: [senti[t] for t in ts],
                               lambda ts: [0.9 if t == "bad" else 0.2 for t in ts], "profanity")  # fmt: skip
    assert scores["sentiment/group=American_actors"] == pytest.approx(0.1)
    assert scores["positive/group=American_actors"] == 0.5 and scores["negative/group=American_actors"] == 0.5
    assert scores["profanity/group=American_actors"] == pytest.approx(0.55)
    assert scores["profanity_share/group=American_actresses"] == 0.0
    assert scores["profanity_gap"] == pytest.approx(0.35) and scores["sentiment_gap"] == pytest.approx(0.0)
    # standard errors of the means: actors' sentiment (0.8, -0.6): sd = 1.4 / sqrt(2), se = sd / sqrt(2) = 0.7
    assert scores["sentiment_se/group=American_actors"] == pytest.approx(0.7)
    assert scores["profanity_se/group=American_actors"] == pytest.approx(0.35)
    assert math.isnan(scores["profanity_se/group=American_actresses"])  # one continuation


def _root(tmp_path: Path) -> Path:
    root = write_bold(tmp_path / "lm_bias")
    write_stereoset(root / "stereoset" / "dev.json", [
        ("The man was BLANK.", "gender", "the man was a king .", "the man was a actress .", "the man was the ."),
        ("The mother was BLANK.", "gender", "the mother sang .", "the mother played .", "the mother of ."),
    ])  # fmt: skip
    (root / "crows_pairs").mkdir()
    (root / "crows_pairs" / "crows_pairs_anonymized.csv").write_text(
        CROWS_HEADER + "0,she sang .,he sang .,stereo,gender,[],a0,[]\n1,the man played .,the boy played .,"
        "antistereo,age,[],a1,[]\n")  # fmt: skip
    (root / "winobias").mkdir()
    lines = {"dev": "[The actor] sang because [he] was a star .", "test": "[The wife] sang to [her] son ."}
    for s in ("pro", "anti"):
        for t in ("1", "2"):
            for split, text in lines.items():
                (root / "winobias" / f"{s}_stereotyped_type{t}.txt.{split}").write_text(f"1 {text}\n")
    return root


def test_validation_logs_every_benchmark_under_bias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = _root(tmp_path)
    tok = build_tokenizer(tmp_path / "tok")
    data = LMCorpusDataModule(root=str(root), tokenizer=str(tok), block_size=16, held_out=0.5, seed=3)
    task = CausalLMTask(CausalLM(config={**LLAMA, "vocab_size": len(data.tokenizer)}))
    scored: list[str] = []
    monkeypatch.setattr(bias_eval, "vader_scorer", lambda: lambda ts: [0.5] * len(ts))
    monkeypatch.setattr(bias_eval, "profanity_scorer", lambda: lambda ts: scored.extend(ts) or [0.0] * len(ts))
    settings = GenerationSettings(max_new_tokens=3, seed=7)
    callback = bias_eval.BiasEvaluation(generation=settings)  # root: the DataModule's
    metrics = trainer(tmp_path, [callback], limit_val_batches=None).validate(task, datamodule=data, verbose=False)[0]
    model, tokenizer = task.backbone, data.tokenizer
    stereo = evaluate_stereoset(model, tokenizer, read_stereoset(root / "stereoset" / "dev.json"))
    assert metrics["val/bias/stereoset_ss/group=gender"] == stereo["gender"]["ss"]
    assert metrics["val/bias/stereoset_icat/group=overall"] == pytest.approx(stereo["overall"]["icat"])
    crows = evaluate_crows_pairs(model, tokenizer, read_crows_pairs(root / "crows_pairs/crows_pairs_anonymized.csv"))
    assert metrics["val/bias/crows/group=age"] == crows["age"] and "val/bias/crows/group=overall" in metrics
    swap = WordSwapper([root / "gender_swaps/generalized_swaps.txt"]).swap
    gap = evaluate_perplexity_gap(model, tokenizer, ["The actor sang because he was a star ."] * 4, swap)  # dev
    assert metrics["val/bias/ppl_gap"] == pytest.approx(gap["gap"], rel=1e-4)
    assert metrics["val/bias/ppl_original"] == pytest.approx(gap["ppl_original"], rel=1e-4)
    # BOLD: only prompts of the DataModule's validation entities were continued
    prompts = json.loads((root / "bold/prompts/gender_prompt.json").read_text())
    val = [(g, e) for g, ents in prompts.items() for e in ents if data.held_out_split("gender", e) == "val"]
    assert val and len(val) < 6
    counts = {g: sum(len(prompts[g][e]) for gg, e in val if gg == g) for g in prompts}
    for group, n in counts.items():
        if n:
            assert metrics[f"val/bias/bold_count/group={group}"] == n
    assert len(scored) == sum(counts.values())
    assert metrics["val/bias/bold_profanity_gap"] == 0.0  # named profanity, never toxicity, with the proxy
    # the continuations are reproducible: the generation seed is fixed and the global RNG is left alone
    state = torch.random.get_rng_state()
    again = generate(model.lm, tokenizer, ["jacob zachar is an american actor whose"] * 2, settings)
    assert torch.equal(state, torch.random.get_rng_state())
    assert again == generate(model.lm, tokenizer, ["jacob zachar is an american actor whose"] * 2, settings)


def test_vader_scorer_when_installed():
    pytest.importorskip("vaderSentiment", reason="VADER not installed (pip install vaderSentiment, or dplit[lm])")
    positive, negative, neutral = bias_eval.vader_scorer()(["What a wonderful actor!", "A terrible, awful film.", "a"])
    assert positive >= 0.5 and negative <= -0.5 and neutral == 0.0


def test_limit_draws_a_fixed_spread_subset():
    callback = bias_eval.BiasEvaluation(root=".", limit=5)
    items = list(range(100))
    first, again = callback._take(items), callback._take(items)
    assert first == again == sorted(first) and len(set(first)) == 5 and max(first) > 5
    assert bias_eval.BiasEvaluation(root=".")._take(items) == items


def test_groups_keep_one_bias_type_before_limit_draws():
    from types import SimpleNamespace

    items = [SimpleNamespace(bias_type=t, i=i) for i, t in enumerate(["race", "gender"] * 50)]
    kept = bias_eval.BiasEvaluation(root=".", groups=["gender"])._keep(items, "crows_pairs")
    assert [it.i for it in kept] == list(range(1, 100, 2))
    assert bias_eval.BiasEvaluation(root=".")._keep(items, "crows_pairs") == items
    with pytest.raises(ValueError, match=r"groups \['age'\].*crows_pairs.*\['gender', 'race'\]"):
        bias_eval.BiasEvaluation(root=".", groups=["age"])._keep(items, "crows_pairs")
