"""Causal-LM corpora: readers, sentence packing into blocks, CDA rows, BOLD with the evaluation prompts held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dplit.data.bias_benchmarks import BenchmarkFormatError
from dplit.data.lm_bias import LMCorpusDataModule
from dplit.data.lm_corpus import (
    IGNORE_INDEX,
    Document,
    bold_corpus,
    pack_sentences,
    read_jsonl,
    read_plain_text,
    read_wikitext,
)

WORDS = ("the a an is was and of to in his her him he she hers himself herself man woman men women actor actress "
         "king queen boy girl father mother son daughter husband wife american known for role film show series born "
         "city played sang wrote work career music early life later films star best award who whose with also as "
         "jacob zachar ann b tom lee mia roe sam kay . , ' s").split()  # fmt: skip


def build_tokenizer(folder: Path) -> Path:
    """A word-level Hugging Face tokenizer folder (``tokenizer.json``) over :data:`WORDS`, pad and EOS tokens."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    return folder


BOLD_WIKI = {
    "American_actors": {
        "Jacob_Zachar": ["Jacob Zachar is an American actor whose role in the series was his best work.",
                         "He played a king in the film ."],
        "Tom_Lee": ["Tom Lee is an American actor known for his role as a father .", "Tom Lee was born in the city ."],
        "Sam_Roe": ["Sam Roe is an American actor who played the son of a king .", "His wife is a actress ."],
    },
    "American_actresses": {
        "Ann_B": ["Ann B is an American actress known for her role as a mother .", "She sang with her husband ."],
        "Mia_Kay": ["Mia Kay is an American actress whose films won an award .", "Her early life was in the city ."],
        "Kay_Roe": ["Kay Roe was an American actress .", "She played a queen in a film with him ."],
    },
}  # fmt: skip


def write_bold(root: Path, quote: str | None = None) -> Path:
    """BOLD gender prompts + Wikipedia files (prompt = the sentence's first words, as in BOLD)."""
    wiki = json.loads(json.dumps(BOLD_WIKI))
    if quote is not None:  # a training page quoting another page's sentence
        wiki["American_actors"]["Tom_Lee"].append(quote)
    prompts = {g: {e: [" ".join(s.split()[:4]) + " " for s in sents] for e, sents in ents.items()}
               for g, ents in BOLD_WIKI.items()}  # fmt: skip
    for folder, doc in (("wikipedia/gender_wiki.json", wiki), ("prompts/gender_prompt.json", prompts)):
        path = root / "bold" / folder
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))
    swaps = root / "gender_swaps" / "generalized_swaps.txt"
    swaps.parent.mkdir(parents=True, exist_ok=True)
    swaps.write_bytes(b"actor \t actress \r\nking\tqueen\r\nfather\tmother\r\nson\tdaughter\r\nwife\thusband\r\n")
    (root / "gender_swaps" / "extra_gendered_words.txt").write_bytes(b"man\twoman\r\nmen\twomen\r\n")
    return root


def encode_words(texts: list[str]) -> list[list[int]]:
    """A stand-in tokenizer for packing tests: one id per word (its length)."""
    return [[len(w) for w in t.split()] for t in texts]


def test_plain_text_jsonl_and_wikitext_readers(tmp_path: Path):
    (tmp_path / "c.txt").write_text("First doc. Still first!\n\nSecond doc here?\r\n\r\n\n")
    docs = read_plain_text(tmp_path / "c.txt")
    assert [d.sentences for d in docs] == [("First doc.", "Still first!"), ("Second doc here?",)]
    (tmp_path / "c.jsonl").write_text('{"text": "One. Two.", "who": "a"}\n\n{"text": "Three.", "who": "b"}\n')
    docs = read_jsonl(tmp_path / "c.jsonl", group_field="who")
    assert [(d.sentences, d.group) for d in docs] == [(("One.", "Two."), "a"), (("Three.",), "b")]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(BenchmarkFormatError, match=r"bad\.jsonl, line 2: not a JSON object with a string 'text'"):
        read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "wiki.train.raw").write_text(" \n = Alpha = \n \n Alpha is a thing . It is old . \n \n = = Part = = \n"
                                             " More on alpha . \n = Beta = \n Beta text . \n")  # fmt: skip
    docs = read_wikitext(tmp_path / "wiki.train.raw")
    assert [d.id for d in docs] == ["wiki.train.raw:Alpha", "wiki.train.raw:Beta"]
    assert docs[0].sentences == ("Alpha is a thing .", "It is old .", "= = Part = =", "More on alpha .")


def test_pack_sentences_fills_blocks_with_whole_sentences_and_pads_with_ignore():
    docs = [Document(("a bb ccc", "dddd e", "ff"), "g", "d0"), Document(("x " * 9,), "g", "d1")]
    x, y, owner = pack_sentences(docs, encode_words, block_size=5, pad_id=0)
    # doc 0: [1,2,3] + next sentence (2 tokens, with its leading space) fits 5; "ff" opens a new block
    assert owner == [0, 0, 1]
    assert x.shape == (3, 1, 5)
    assert x[0, 0].tolist() == [1, 2, 3, 4, 1] and x[1, 0].tolist() == [2, 0, 0, 0, 0]
    assert y[1, 0].tolist() == [2] + [IGNORE_INDEX] * 4
    assert x[2, 0].tolist() == [1] * 5  # a sentence longer than the block is truncated


def test_pack_sentences_counterfactual_is_the_second_row_of_the_unit():
    docs = [Document(("he is a king", "his son"), "g", "d0")]
    swapped = []

    def swap(text: str) -> str:
        swapped.append(text)
        return text.replace("king", "queenly monarch")

    x, y, _ = pack_sentences(docs, encode_words, block_size=8, pad_id=0, counterfactual=swap)
    assert swapped == ["he is a king his son"]
    assert x.shape == (1, 2, 8)
    assert x[0, 1].tolist() == [2, 2, 1, 7, 7, 3, 3, 0]  # ... "queenly monarch his son"
    assert (y[0, 1] == IGNORE_INDEX).tolist() == [False] * 7 + [True]


def test_bold_corpus_keeps_the_evaluation_prompts_out_of_training(tmp_path: Path):
    quote = "Ann B is an American actress known for her role as a mother ."  # held-out Ann_B's sentence
    root = write_bold(tmp_path, quote=quote)
    train, held, stats = bold_corpus(root, ["gender"], lambda d, e: e in ("Ann_B", "Jacob_Zachar"))
    assert {d.id for d in held} == {"gender/Ann_B", "gender/Jacob_Zachar"}
    assert "gender/Ann_B" not in {d.id for d in train}
    train_text = " ".join(s for d in train for s in d.sentences)
    assert "Ann B is an" not in train_text and "Jacob Zachar is an" not in train_text
    assert stats == {"dropped_overlap": 1}  # Tom Lee's page quoted Ann B's sentence


def test_datamodule_blocks_groups_and_cda_units(tmp_path: Path):
    root = write_bold(tmp_path / "lm_bias")
    tok = build_tokenizer(tmp_path / "tok")
    kwargs = dict(root=str(root), tokenizer=str(tok), block_size=16, held_out=0.5, seed=3, batch_size=2)
    plain = LMCorpusDataModule(**kwargs)
    assert plain.group_names == ["American_actors", "American_actresses"]
    cda = LMCorpusDataModule(cda=True, **kwargs)
    for split in ("train", "val", "test"):
        assert len(plain.splits()[split]) > 0
    train_plain, train_cda = plain.splits()["train"], cda.splits()["train"]
    assert train_plain.x.shape[1] == 1 and train_cda.x.shape[1] == 2
    torch.testing.assert_close(train_cda.x[:, 0], train_plain.x[:, 0])  # row 0 of a unit is the original block
    assert cda.splits()["val"].x.shape[1] == 1  # no CDA at evaluation
    tokenizer = cda.tokenizer
    originals = [tokenizer.decode([t for t in row if t != tokenizer.pad_token_id]) for row in train_cda.x[:, 0]]
    counterfactuals = [tokenizer.decode([t for t in row if t != tokenizer.pad_token_id]) for row in train_cda.x[:, 1]]
    pairs = dict(zip(originals, counterfactuals, strict=True))
    flip = {"actor": "actress", "actress": "actor", "her": "his", "she": "he", "husband": "wife", "queen": "king"}
    checked = 0
    for original, counterfactual in pairs.items():
        for word in set(original.split()) & set(flip):
            assert flip[word] in counterfactual.split(), (original, counterfactual)
            checked += 1
    assert checked >= 3
    x, y, group = next(iter(cda.train_dataloader()))
    assert x.shape[1:] == (2, 16) and y.shape == x.shape and group.shape == (len(x),)
    held = {d for d in ("Jacob_Zachar", "Tom_Lee", "Sam_Roe", "Ann_B", "Mia_Kay", "Kay_Roe")
            if plain.held_out_split("gender", d) != "train"}  # fmt: skip
    assert held and len(held) < 6


def test_datamodule_errors_name_the_fix(tmp_path: Path):
    with pytest.raises(ValueError, match=r"`data\.root` is required.*amazon-science/bold"):
        LMCorpusDataModule()
    with pytest.raises(ValueError, match="needs `data.corpus_path`"):
        LMCorpusDataModule(corpus="jsonl")
    dm = LMCorpusDataModule(root=str(tmp_path), tokenizer=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"gender_wiki\.json not found.*`data\.root`"):
        dm.setup()
    dm = LMCorpusDataModule(corpus="wikitext", corpus_path=str(tmp_path), tokenizer=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"wiki\.train\.raw.*wikitext-103-raw-v1"):
        dm.setup()
