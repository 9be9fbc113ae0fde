"""Corpus readers and block packing for causal-LM fine-tuning.

A corpus is a list of :class:`Document` (text split into sentences, with a group name). Readers: plain text
(documents separated by blank lines), JSONL (one ``{"text": ...}`` object a line, optional group field), WikiText's
raw files (``wiki.{train,valid,test}.raw``, articles split at ``= Title =`` lines) and BOLD's Wikipedia sentences
(:func:`bold_corpus`, one document per BOLD entity).

Packing (:func:`pack_sentences`): each document's sentences are packed greedily, in order, into chunks whose
tokens fit ``block_size`` (a longer sentence is truncated to ``block_size`` tokens); a chunk never spans two
documents, so its group is its document's. A chunk is the unit of privacy and
one row of the batch; with CDA its counterfactual (the chunk's text with the gendered words swapped) is a second
row of the same unit. Rows are right-padded; padded positions have label -100.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dplit.data.bias_benchmarks import BenchmarkFormatError, benchmark_file, read_bold

__all__ = [
    "IGNORE_INDEX",
    "Document",
    "bold_corpus",
    "pack_sentences",
    "read_jsonl",
    "read_plain_text",
    "read_wikitext",
    "split_sentences",
]

IGNORE_INDEX = -100
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


@dataclass(frozen=True)
class Document:
    """One document: its sentences (in order), group name, and a stable id (entity, title or line)."""

    sentences: tuple[str, ...]
    group: str
    id: str


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: split after ``.``, ``!`` or ``?`` followed by white space; lines kept apart."""
    out: list[str] = []
    for line in text.split("\n"):
        out.extend(s.strip() for s in _SENTENCE_END.split(line) if s.strip())
    return out


def read_plain_text(path: str | Path, group: str = "all") -> list[Document]:
    """Documents of a UTF-8 text file, separated by blank lines."""
    path = Path(path)
    blocks = re.split(r"\n\s*\n", path.read_text(encoding="utf-8").replace("\r\n", "\n"))
    return [Document(tuple(split_sentences(b)), group, f"{path.name}:{i}") for i, b in enumerate(blocks) if b.strip()]


def read_jsonl(path: str | Path, text_field: str = "text", group_field: str | None = None) -> list[Document]:
    """Documents of a JSONL file: one object a line with a string ``text_field`` (and ``group_field``)."""
    path = Path(path)
    docs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            text = obj[text_field]
            group = str(obj[group_field]) if group_field else "all"
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BenchmarkFormatError(
                f"{path}, line {number}: not a JSON object with a string {text_field!r}"
                + (f" and {group_field!r}" if group_field else "")
                + f' ({type(err).__name__}: {err}). Fix: one object a line, e.g. {{"{text_field}": "..."}}.'
            ) from None
        if not isinstance(text, str):
            raise BenchmarkFormatError(f"{path}, line {number}: {text_field!r} is {type(text).__name__}, not a string")
        docs.append(Document(tuple(split_sentences(text)), group, f"{path.name}:{number}"))
    return docs


def read_wikitext(path: str | Path) -> list[Document]:
    """Articles of a WikiText raw file (``wiki.train.raw``): a `` = Title = `` line starts each article."""
    path = Path(path)
    docs: list[Document] = []
    title = ""
    lines: list[str] = []

    def flush() -> None:
        sentences = tuple(s for line in lines for s in split_sentences(line))
        if sentences:
            docs.append(Document(sentences, "all", f"{path.name}:{title or len(docs)}"))

    for line in path.read_text(encoding="utf-8").split("\n"):
        if _WIKI_TITLE.match(line):
            flush()
            title, lines = line.strip(" ="), []
        elif line.strip():
            lines.append(line.strip())
    flush()
    return docs


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def bold_corpus(
    root: str | Path, domains: Iterable[str], held_out: Callable[[str, str], bool]
) -> tuple[list[Document], list[Document], dict[str, int]]:
    """BOLD Wikipedia sentences as documents (one per entity, group = BOLD group), split by entity.

    Keeping the evaluation prompts out of the training text: an entity for which ``held_out(domain, entity)`` is
    true gives the held-out documents (its prompts are the only ones evaluated); every other entity gives training
    documents, from which any sentence that contains a held-out prompt (compared lower-cased, white space
    normalised) is also dropped (BOLD prompts are sentence prefixes; one page can quote another's sentence).

    Returns:
        ``(train documents, held-out documents, {"dropped_overlap": n})``.
    """
    train: list[Document] = []
    held: list[Document] = []
    prompts: list[str] = []
    for domain in domains:
        wiki = read_bold(benchmark_file(root, "bold_wikipedia", domain=domain), domain)
        by_entity: dict[tuple[str, str], list[str]] = {}
        for t in wiki:
            by_entity.setdefault((t.group, t.entity), []).append(t.text)
        for (group, entity), sentences in by_entity.items():
            doc = Document(tuple(s for s in sentences if s.strip()), group, f"{domain}/{entity}")
            (held if held_out(domain, entity) else train).append(doc)
        prompt_file = benchmark_file(root, "bold_prompts", domain=domain)
        prompts += [_normalise(p.text) for p in read_bold(prompt_file, domain) if held_out(domain, p.entity)]
    prompts = [p for p in prompts if p]
    dropped = 0
    clean = []
    for doc in train:
        kept = tuple(s for s in doc.sentences if not any(p in _normalise(s) for p in prompts))
        dropped += len(doc.sentences) - len(kept)
        if kept:
            clean.append(Document(kept, doc.group, doc.id))
    return clean, held, {"dropped_overlap": dropped}


def _chunks(lengths: list[int], block_size: int) -> list[list[int]]:
    """Greedy packing of sentences (token counts, each at most ``block_size``) into chunks: sentence indices."""
    chunks: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > block_size:
            chunks.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        chunks.append(current)
    return chunks


def pack_sentences(
    documents: list[Document],
    tokenizer: Callable[[list[str]], list[list[int]]],
    block_size: int,
    pad_id: int,
    counterfactual: Callable[[str], str] | None = None,
) -> tuple[Tensor, Tensor, list[int]]:
    """Pack documents into chunks: ``(ids [N, K, T], labels [N, K, T], document index per chunk)``.

    Each sentence is tokenised with a leading space after the first of its document (as it followed in the text)
    and truncated to ``T = block_size`` tokens; whole sentences are packed greedily, in order, into chunks of at
    most ``T`` tokens. ``K`` is 1, or 2 with ``counterfactual``: row 1 is the tokenised counterfactual of row 0's
    text (truncated to ``T``).
    """
    units: list[list[list[int]]] = []
    owner: list[int] = []
    for d, doc in enumerate(documents):
        texts = [s if i == 0 else " " + s for i, s in enumerate(doc.sentences)]
        ids = [seq[:block_size] for seq in tokenizer(texts)] if texts else []
        for chunk in _chunks([len(seq) for seq in ids], block_size):
            unit = [[t for i in chunk for t in ids[i]]]
            if counterfactual is not None:
                text = "".join(texts[i] for i in chunk)
                unit.append(tokenizer([counterfactual(text)])[0][:block_size])
            units.append(unit)
            owner.append(d)
    k = 2 if counterfactual is not None else 1
    x = torch.full((len(units), k, block_size), pad_id, dtype=torch.int64)
    y = torch.full((len(units), k, block_size), IGNORE_INDEX, dtype=torch.int64)
    for i, unit in enumerate(units):
        for j, seq in enumerate(unit):
            x[i, j, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
            y[i, j, : len(seq)] = torch.tensor(seq, dtype=torch.int64)
    return x, y, owner
