"""A tiny folder laid out like ``../shared/data/lm_bias`` (BOLD gender / race / religion prompts and Wikipedia
sentences, StereoSet, CrowS-Pairs, WinoBias, gender-swap lists, in their real formats), a word-level tokenizer, and
the arguments that run an ``lm_bias_*`` config on them with a tiny Llama (the scorers stubbed: VADER and the
profanity model are optional packages)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_bias_evaluation import LLAMA, _root
from test_lm_corpus import build_tokenizer

import dplit.metrics.bias_eval as bias_eval

OTHER_DOMAINS = {  # BOLD's real group names; sentences in the fixture tokenizer's words
    "race": {"African_Americans": {"Tom_Lee": ["Tom Lee is an American actor .", "He sang in the city ."]},
             "European_Americans": {"Sam_Roe": ["Sam Roe is an American actor .", "He wrote music ."]}},
    "religious_ideology": {"judaism": {"Judaism": ["The work of the city is known .", "Its early life ."]},
                           "christianity": {"Christianity": ["The best work is music .", "Its later life ."]}},
}  # fmt: skip
_FILES = {"race": "race", "religious_ideology": "religious_ideology"}


def write_lm_bias_root(tmp_path: Path) -> Path:
    """The benchmark root: the gender files of ``tests/test_bias_evaluation.py`` plus race and religion."""
    root = _root(tmp_path)
    for domain, groups in OTHER_DOMAINS.items():
        prompts = {g: {e: [" ".join(s.split()[:3]) + " " for s in sents] for e, sents in ents.items()}
                   for g, ents in groups.items()}  # fmt: skip
        (root / "bold" / "wikipedia" / f"{_FILES[domain]}_wiki.json").write_text(json.dumps(groups))
        (root / "bold" / "prompts" / f"{_FILES[domain]}_prompt.json").write_text(json.dumps(prompts))
    return root


def lm_args(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> list[str]:
    """For an ``LMCorpusDataModule`` config: the fixture root and tokenizer, a tiny Llama, stubbed scorers, one torch
    thread for the test (tiny models spin on a loaded machine with more)."""
    if "LMCorpusDataModule" not in config.read_text():
        return []
    from transformers import AutoTokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))

    root = write_lm_bias_root(tmp_path / "data")
    tok = build_tokenizer(tmp_path / "tok")
    vocab = len(AutoTokenizer.from_pretrained(tok))
    monkeypatch.setattr(bias_eval, "vader_scorer", lambda: lambda ts: [0.0] * len(ts))
    monkeypatch.setattr(bias_eval, "profanity_scorer", lambda: lambda ts: [0.0] * len(ts))
    llama = json.dumps({**LLAMA, "vocab_size": vocab})
    return [f"--data.init_args.root={root}", f"--data.init_args.tokenizer={tok}", "--data.init_args.block_size=16",
            "--data.init_args.held_out=0.5", "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=4",
            f"--model.init_args.backbone.init_args.config={llama}"]  # fmt: skip
