"""Readers of the language-model bias benchmarks in their published formats.

``root`` is laid out like ``../shared/data/lm_bias`` (see :data:`LAYOUT`): StereoSet ``dev.json``, CrowS-Pairs'
CSV, BOLD's prompt and Wikipedia JSON files, WinoBias' bracketed sentence files and gender word-pair lists
(read by :func:`dplit.text.cda.read_word_pairs`). A missing file raises ``FileNotFoundError`` naming the file,
where the benchmark is published and ``data.root``; a file in the wrong format raises
:class:`BenchmarkFormatError` naming the file, the item and the expected format.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "BOLD_DOMAINS",
    "LAYOUT",
    "BenchmarkFormatError",
    "BoldText",
    "CrowsPair",
    "StereoSetItem",
    "WinoBiasItem",
    "benchmark_file",
    "read_bold",
    "read_crows_pairs",
    "read_stereoset",
    "read_winobias",
    "read_word_list",
]

LAYOUT = {
    "stereoset": ("stereoset/dev.json", "https://github.com/moinnadeem/StereoSet (data/dev.json)"),
    "crows_pairs": (
        "crows_pairs/crows_pairs_anonymized.csv",
        "https://github.com/nyu-mll/crows-pairs (data/crows_pairs_anonymized.csv)",
    ),
    "bold_prompts": ("bold/prompts/{domain}_prompt.json", "https://github.com/amazon-science/bold (prompts/)"),
    "bold_wikipedia": ("bold/wikipedia/{domain}_wiki.json", "https://github.com/amazon-science/bold (wikipedia/)"),
    "winobias": (
        "winobias/{stereotype}_stereotyped_type{type}.txt.{split}",
        "https://github.com/uclanlp/corefBias (WinoBias/wino/data/)",
    ),
    "gender_swaps": ("gender_swaps/{name}", "https://github.com/uclanlp/corefBias (WinoBias/wino/)"),
}
"""Benchmark -> (path under ``data.root``, where it is published)."""

BOLD_DOMAINS = ("gender", "race", "religious_ideology", "political_ideology", "profession")
STEREOSET_LABELS = ("stereotype", "anti-stereotype", "unrelated")
CROWS_COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")


class BenchmarkFormatError(ValueError):
    """A benchmark file is not in its published format."""


def benchmark_file(root: str | Path, benchmark: str, **fields: str) -> Path:
    """The path of a benchmark file under ``root`` (see :data:`LAYOUT`), checked to exist."""
    pattern, source = LAYOUT[benchmark]
    path = Path(root) / pattern.format(**fields)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: data.root={root} must be laid out like ../shared/data/lm_bias, with {pattern} "
            f"(published at {source}). Fix: point `data.root` at such a folder, or put the file there."
        )
    return path


def _bad(path: Path, where: str, expected: str) -> BenchmarkFormatError:
    return BenchmarkFormatError(f"{path}: {where}; expected {expected}. Fix: use the file as published, unchanged.")


def _load_json(path: Path, expected: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _bad(path, f"not JSON ({err})", expected) from None


# ---------------------------------------------------------------- StereoSet
@dataclass(frozen=True)
class StereoSetItem:
    """One StereoSet item: a context and its stereotype / anti-stereotype / unrelated continuation or filling."""

    id: str
    target: str
    bias_type: str
    context: str
    stereotype: str
    anti_stereotype: str
    unrelated: str


def read_stereoset(
    path: str | Path, task: Literal["intrasentence", "intersentence"] = "intrasentence"
) -> list[StereoSetItem]:
    """Items of one StereoSet task from ``dev.json`` (``{"version", "data": {task: [item, ...]}}``), file order.

    Intrasentence sentences are the whole filled-in sentence; intersentence ones follow the ``context``.
    """
    path = Path(path)
    expected = '{"version": ..., "data": {"intrasentence": [...], "intersentence": [...]}} (StereoSet dev.json)'
    doc = _load_json(path, expected)
    items = doc.get("data", {}).get(task) if isinstance(doc, dict) and isinstance(doc.get("data"), dict) else None
    if not isinstance(items, list):
        raise _bad(path, f'no list at ["data"][{task!r}]', expected)
    out = []
    for i, item in enumerate(items):
        try:
            by_label = {s["gold_label"]: s["sentence"] for s in item["sentences"]}
            fields = {k: str(item[k]) for k in ("id", "target", "bias_type", "context")}
        except (KeyError, TypeError) as err:
            raise _bad(path, f"{task} item {i} lacks {err}", "id, target, bias_type, context and sentences "
                       "[{sentence, gold_label}, ...]") from None  # fmt: skip
        if sorted(by_label) != sorted(STEREOSET_LABELS) or len(item["sentences"]) != 3:
            raise _bad(path, f"{task} item {i} (id {fields['id']}) has gold labels {sorted(by_label)}",
                       f"one sentence each labelled {', '.join(STEREOSET_LABELS)}")  # fmt: skip
        sentences = {"stereotype": by_label["stereotype"], "anti_stereotype": by_label["anti-stereotype"],
                     "unrelated": by_label["unrelated"]}  # fmt: skip
        out.append(StereoSetItem(**fields, **sentences))
    return out


# ---------------------------------------------------------------- CrowS-Pairs
@dataclass(frozen=True)
class CrowsPair:
    """One CrowS-Pairs pair: the more and the less stereotypical sentence, its direction and bias type."""

    sent_more: str
    sent_less: str
    direction: Literal["stereo", "antistereo"]
    bias_type: str


def read_crows_pairs(path: str | Path) -> list[CrowsPair]:
    """Pairs of ``crows_pairs_anonymized.csv`` (header with ``sent_more, sent_less, stereo_antistereo, bias_type``)."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in CROWS_COLUMNS if c not in header]
        if missing:
            raise _bad(path, f"header {header} lacks {missing}", f"a CSV header with {', '.join(CROWS_COLUMNS)}")
        out = []
        for row in reader:
            direction = row["stereo_antistereo"]
            if direction not in ("stereo", "antistereo") or not row["sent_more"] or not row["sent_less"]:
                raise _bad(path, f"line {reader.line_num}: stereo_antistereo {direction!r}, sent_more "
                           f"{row['sent_more']!r}", "stereo or antistereo and two non-empty sentences")  # fmt: skip
            out.append(CrowsPair(row["sent_more"], row["sent_less"], direction, row["bias_type"]))  # type: ignore[arg-type]
    return out


# ---------------------------------------------------------------- BOLD
@dataclass(frozen=True)
class BoldText:
    """A BOLD prompt or Wikipedia sentence: domain (e.g. ``gender``), group (``American_actresses``), entity."""

    domain: str
    group: str
    entity: str
    text: str


def read_bold(path: str | Path, domain: str) -> list[BoldText]:
    """A BOLD ``<domain>_prompt.json`` or ``<domain>_wiki.json`` file (``{group: {entity: [text, ...]}}``)."""
    path = Path(path)
    expected = '{"<group>": {"<entity>": ["text", ...], ...}, ...} (BOLD prompts/ or wikipedia/ JSON)'
    doc = _load_json(path, expected)
    if not isinstance(doc, dict):
        raise _bad(path, f"top level is {type(doc).__name__}", expected)
    out: list[BoldText] = []
    for group, entities in doc.items():
        if not isinstance(entities, dict):
            raise _bad(path, f"group {group!r} holds {type(entities).__name__}", expected)
        for entity, texts in entities.items():
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise _bad(path, f"{group!r} / {entity!r} is not a list of strings", expected)
            out.extend(BoldText(domain, group, entity, t) for t in texts)
    return out


# ---------------------------------------------------------------- WinoBias
@dataclass(frozen=True)
class WinoBiasItem:
    """One WinoBias sentence: text without brackets, the entity (first bracket) and the pronoun mentions."""

    id: int
    text: str
    entity: str
    pronouns: tuple[str, ...]
    stereotype: Literal["pro", "anti"]
    type: int
    split: str


_WINO = re.compile(r"^(\d+) (.*)$")
_BRACKET = re.compile(r"\[([^\[\]]+)\]")


def read_winobias(path: str | Path) -> list[WinoBiasItem]:
    """A WinoBias file ``{pro,anti}_stereotyped_type{1,2}.txt.{dev,test}``: ``<n> text with [entity] ... [pronoun]``."""
    path = Path(path)
    name = re.match(r"^(pro|anti)_stereotyped_type([12])\.txt\.(\w+)$", path.name)
    if name is None:
        raise _bad(path, "unexpected file name", "{pro,anti}_stereotyped_type{1,2}.txt.{dev,test}")
    out = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        m = _WINO.match(line)
        spans = _BRACKET.findall(line)
        if m is None or len(spans) < 2:
            raise _bad(path, f"line {number}: {line!r}", "`<number> <sentence>` with an [entity] and a [pronoun]")
        text = _BRACKET.sub(r"\1", m.group(2))
        out.append(WinoBiasItem(int(m.group(1)), text, spans[0], tuple(spans[1:]), name.group(1),  # type: ignore[arg-type]
                                int(name.group(2)), name.group(3)))  # fmt: skip
    return out


def read_word_list(path: str | Path) -> list[str]:
    """One word or phrase a line (WinoBias' occupation lists), stripped; blank lines skipped."""
    return [w.strip() for w in Path(path).read_text(encoding="utf-8").split("\n") if w.strip()]
