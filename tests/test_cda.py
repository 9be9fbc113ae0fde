"""Counterfactual Data Augmentation: word-pair files, two-sided swaps, case, punctuation, possessives, her/his."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dplit.text.cda import WordPairFileError, WordSwapper, read_word_pairs

# The real lists, when present: $DPLIT_LM_BIAS_ROOT, or ../shared/data/lm_bias next to the checkout.
LM_BIAS = Path(os.environ.get("DPLIT_LM_BIAS_ROOT", Path(__file__).resolve().parents[2] / "shared/data/lm_bias"))
REAL = LM_BIAS / "gender_swaps"

# The real file's format: tab-separated, spaces around the tab on some lines, CRLF endings.
PAIRS = "actor \t actress \r\nboy\tgirl \r\nboys \t girls\r\n"
PAIRS += "man \t woman \r\nmen\twomen\r\nking\tqueen\r\nmr. \t mrs. \r\nma'am \t sir \r\n"
PAIRS += "him \t her \r\nhis \t her \r\nwife \t husband\r\n"


@pytest.fixture
def swapper(tmp_path: Path) -> WordSwapper:
    path = tmp_path / "pairs.txt"
    path.write_bytes(PAIRS.encode())
    return WordSwapper([path])


def test_reader_strips_spaces_and_crlf_and_lowercases(tmp_path: Path):
    path = tmp_path / "pairs.txt"
    path.write_bytes(b"# comment\r\n\r\nActor \t Actress \r\nboys boys'\n")
    pairs = read_word_pairs(path)
    assert [(p.source, p.target, p.line) for p in pairs] == [("actor", "actress", 3), ("boys", "boys'", 4)]


@pytest.mark.parametrize("line", ["actor", "actor\tactress\textra", "ma am\tsir", "actor\t", "1st\tfirst"])
def test_reader_names_file_and_line_of_an_odd_line(tmp_path: Path, line: str):
    path = tmp_path / "bad_pairs.txt"
    path.write_text(f"boy\tgirl\n{line}\n", encoding="utf-8")
    with pytest.raises(WordPairFileError, match=r"bad_pairs\.txt, line 2: .*Fix: write one pair a line"):
        read_word_pairs(path)


def test_reader_missing_and_empty_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_word_pairs(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(WordPairFileError, match="no word pairs"):
        read_word_pairs(tmp_path / "empty.txt")


def test_two_sided_case_and_punctuation(swapper: WordSwapper):
    assert swapper.swap("The actress met a boy, then a KING!") == "The actor met a girl, then a QUEEN!"
    assert swapper.swap("Men and women.") == "Women and men."
    assert swapper.swap("Mr. Brown and Mrs. Green") == "Mrs. Brown and Mr. Green"
    assert swapper.swap("Ma'am, yes sir.") == "Sir, yes ma'am."
    assert swapper.swap("the mankind manual") == "the mankind manual"  # whole words only
    assert swapper.swap_counted("no gendered words here") == ("no gendered words here", 0)


def test_possessives_and_clitics(swapper: WordSwapper):
    assert swapper.swap("the man's hat and the boys' toys") == "the woman's hat and the girls' toys"
    assert swapper.swap("He's sure she'll come; he\u2019d know") == "She's sure he'll come; she\u2019d know"
    assert swapper.swap("The king's wife") == "The queen's husband"


def test_her_before_a_noun_or_adjective_becomes_his(swapper: WordSwapper):
    assert swapper.swap("She lost her book.") == "He lost his book."
    assert swapper.swap("her own car") == "his own car"
    assert swapper.swap("Her dog barked") == "His dog barked"


def test_her_as_an_object_becomes_him(swapper: WordSwapper):
    assert swapper.swap("I saw her.") == "I saw him."
    assert swapper.swap("I saw her. Then I left") == "I saw him. Then I left"  # the period ends the phrase
    assert swapper.swap("He gave her the key") == "She gave him the key"
    assert swapper.swap("we told her that it was late") == "we told him that it was late"
    assert swapper.swap("with her and me") == "with him and me"
    assert swapper.swap("ask her") == "ask him"
    assert swapper.swap("Thank HER, now") == "Thank HIM, now"


def test_his_mirrors_her_and_pronouns_override_the_file(swapper: WordSwapper):
    assert swapper.swap("His car is red") == "Her car is red"
    assert swapper.swap("The car is his.") == "The car is hers."
    assert swapper.swap("hers and himself") == "his and herself"
    # the file's `him her` and `his her` lines lose to the built-in rules, and are reported
    assert {(p.source, p.target) for p in swapper.ignored} == {("him", "her"), ("his", "her")}
    assert swapper.swap(swapper.swap("He saw her book")) == "He saw her book"


def test_conflicts_first_claim_wins_and_are_listed(tmp_path: Path):
    path = tmp_path / "pairs.txt"
    path.write_text("priest\tnun\nmonk\tnun\npriest\tpriestess\nlord\tlady\nlady\tgentleman\n", encoding="utf-8")
    swapper = WordSwapper([path])
    assert swapper.swap("priest nun monk lady lord") == "nun priest nun gentleman lady"
    assert len(swapper.conflicts) == 2
    assert any("pairs.txt:3 priest -> priestess" in c for c in swapper.conflicts)
    assert any("nun -> monk by reversal" in c for c in swapper.conflicts)


def test_names_swap_only_when_capitalised(tmp_path: Path, swapper: WordSwapper):
    (tmp_path / "words.txt").write_text("boy\tgirl\n")
    (tmp_path / "names.txt").write_text("John\tMary\nWill\tRose\n")
    named = WordSwapper([tmp_path / "words.txt"], name_files=[tmp_path / "names.txt"])
    assert named.swap("John met Rose; I will smell the rose") == "Mary met Will; I will smell the rose"
    assert named.swap("JOHN's boy") == "MARY's girl"


@pytest.mark.skipif(not (REAL / "generalized_swaps.txt").is_file(), reason=f"real gender-swap lists not in {REAL}")
def test_real_gender_swap_lists_read_and_swap():
    names = ("generalized_swaps.txt", "gendered_words_unidirectional.txt", "extra_gendered_words.txt")
    files = [REAL / n for n in names]
    swapper = WordSwapper(files)
    assert len(swapper.words) > 200
    text = "The actress told her husband that the waiter's son was his."
    assert swapper.swap(text) == "The actor told his wife that the waitress's daughter was hers."
