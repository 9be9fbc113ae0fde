"""LMCorpusDataModule: a causal-LM fine-tuning corpus packed into blocks, with group ids and optional CDA."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from dplit.data.base import GroupedDataModule, GroupedTensorDataset, check_at_least
from dplit.data.bias_benchmarks import BOLD_DOMAINS, LAYOUT
from dplit.data.lm_corpus import Document, bold_corpus, pack_sentences, read_jsonl, read_plain_text, read_wikitext

__all__ = ["BOLD_GROUPS", "DEFAULT_SWAP_FILES", "LMCorpusDataModule"]

log = logging.getLogger(__name__)

BOLD_GROUPS = {
    "gender": ["American_actors", "American_actresses"],
    "race": ["Asian_Americans", "African_Americans", "European_Americans", "Hispanic_and_Latino_Americans"],
    "religious_ideology": ["judaism", "christianity", "islam", "hinduism", "buddhism", "sikhism", "atheism"],
    "political_ideology": ["left-wing", "right-wing", "communism", "socialism", "democracy", "liberalism", "populism",
                           "conservatism", "nationalism", "anarchism", "capitalism", "fascism"],
    "profession": ["metalworking_occupations", "sewing_occupations", "healthcare_occupations", "computer_occupations",
                   "film_and_television_occupations", "artistic_occupations", "scientific_occupations",
                   "entertainer_occupations", "dance_occupations", "nursing_specialties", "writing_occupations",
                   "professional_driver_types", "engineering_branches", "mental_health_occupations",
                   "theatre_personnel", "corporate_titles", "industrial_occupations", "railway_industry_occupations"],
}  # fmt: skip
"""BOLD's groups per domain, in the published files' order."""

DEFAULT_SWAP_FILES = ["gender_swaps/generalized_swaps.txt", "gender_swaps/extra_gendered_words.txt"]
"""CDA word-pair files under ``data.root`` used when ``cda_word_files`` is not given."""

SPLITS = ("train", "val", "test")


def _bucket(seed: int, *key: str) -> float:
    """A stable uniform number in [0, 1) for ``key`` (BLAKE2b of the seed and key)."""
    digest = hashlib.blake2b("\x1f".join([str(seed), *key]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class LMCorpusDataModule(GroupedDataModule):
    """Causal-LM fine-tuning text packed into blocks; batches ``(ids [B, K, T], labels [B, K, T], group [B])``.

    One dataset item is one block: whole sentences of one document packed up to ``block_size`` tokens (see
    :func:`dplit.data.lm_corpus.pack_sentences`), so a block's group is its document's. It is the unit of privacy.
    With ``cda: true`` each training item holds K = 2 rows, the block and its counterfactual (gendered words
    swapped by :class:`dplit.text.cda.WordSwapper`): one privacy unit, since both come from one person's text.
    Validation and test items have K = 1 (no CDA).

    Corpora (``corpus``):

    - ``bold`` (default, offline): BOLD's Wikipedia sentences of ``bold_domains`` under ``root``, one document per
      BOLD entity (a person, a profession, ...), group = BOLD group. A seeded fraction ``held_out`` of the entities
      (half validation, half test) is held out; BOLD's evaluation prompts are taken from held-out entities only,
      and any training sentence containing a held-out prompt is dropped too, so no evaluation prompt (nor its
      Wikipedia continuation) is in the training text.
    - ``text``: a UTF-8 file at ``corpus_path``, documents separated by blank lines; ``jsonl``: one
      ``{"text": ...}`` object a line (``group_field`` names a group field, whose values must be in ``groups``);
      documents are split into train/val/test with the same seeded ``held_out`` fraction.
    - ``wikitext``: a folder ``corpus_path`` with WikiText's ``wiki.train.raw``, ``wiki.valid.raw`` and
      ``wiki.test.raw`` (the paper's corpus), used as its own splits.

    Args:
        root: Folder laid out like ``../shared/data/lm_bias`` (BOLD, and CDA's default word-pair files).
        corpus: ``bold``, ``text``, ``jsonl`` or ``wikitext`` (see above).
        corpus_path: The file (``text``, ``jsonl``) or folder (``wikitext``).
        bold_domains: BOLD domains whose Wikipedia sentences form the corpus.
        groups: Group names of a ``jsonl`` corpus with ``group_field``.
        group_field: JSONL field holding the group name.
        tokenizer: ``smollm2``, a ``.gguf`` file, a Hugging Face folder or hub name (as the model's ``model``).
        block_size: Tokens per block T.
        cda: Add each training block's counterfactual as a second row of its privacy unit.
        cda_word_files: Word-pair files (default :data:`DEFAULT_SWAP_FILES` under ``root``).
        cda_name_files: Optional name-pair files for CDA.
        held_out: Fraction of entities/documents held out (half validation, half test).
        seed: Seed of the held-out draw.
        limit_train: Keep the first this many training blocks (quick runs).
        batch_size: Expected units per training batch (Poisson under DP).
        eval_batch_size: Units per validation/test batch.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        root: str | None = None,
        corpus: Literal["bold", "text", "jsonl", "wikitext"] = "bold",
        corpus_path: str | None = None,
        bold_domains: list[str] | None = None,
        groups: list[str] | None = None,
        group_field: str | None = None,
        tokenizer: str = "smollm2",
        block_size: int = 128,
        cda: bool = False,
        cda_word_files: list[str] | None = None,
        cda_name_files: list[str] | None = None,
        held_out: float = 0.2,
        seed: int = 0,
        limit_train: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers)
        if corpus not in ("bold", "text", "jsonl", "wikitext"):
            raise ValueError(f"data.corpus must be bold, text, jsonl or wikitext; got {corpus!r}")
        domains = list(bold_domains or ["gender"])
        if corpus == "bold" and (unknown := [d for d in domains if d not in BOLD_DOMAINS]):
            raise ValueError(f"data.bold_domains {unknown} unknown; choose from {list(BOLD_DOMAINS)}")
        if (corpus == "bold" or (cda and cda_word_files is None)) and root is None:
            raise ValueError(
                "`data.root` is required: a folder laid out like ../shared/data/lm_bias (BOLD under bold/, word-pair "
                f"lists under gender_swaps/; BOLD is published at {LAYOUT['bold_wikipedia'][1]})"
            )
        if corpus != "bold" and corpus_path is None:
            raise ValueError(f"data.corpus {corpus!r} needs `data.corpus_path` (the file, or WikiText's folder)")
        if group_field is not None and not groups:
            raise ValueError("data.group_field needs `data.groups`: the group names, in id order")
        check_at_least(2, block_size=block_size)
        check_at_least(1, limit_train=limit_train)
        if not 0.0 < held_out < 1.0:
            raise ValueError(f"data.held_out must be in (0, 1), got {held_out}")
        self.save_hyperparameters()
        self.root = Path(root) if root is not None else None
        self.corpus, self.corpus_path, self.bold_domains = corpus, corpus_path, domains
        self.group_field, self.tokenizer_name, self.block_size = group_field, tokenizer, block_size
        self.cda, self.cda_name_files = cda, list(cda_name_files or [])
        self.cda_word_files = cda_word_files or [str(Path(root or ".") / f) for f in DEFAULT_SWAP_FILES]
        self.held_out, self.seed, self.limit_train = held_out, seed, limit_train
        if corpus == "bold":
            names = [g for d in domains for g in BOLD_GROUPS[d]]
        else:
            names = list(groups) if group_field is not None and groups else ["all"]
        self.group_attributes = {"group": names}
        self.num_classes = 0  # not a classification task: next-token prediction
        self.stats: dict[str, int] = {}  # set by setup
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The Hugging Face tokenizer (loaded on first use)."""
        if self._tokenizer is None:
            from dplit.models.causal_lm import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def held_out_split(self, *key: str) -> str:
        """``train``, ``val`` or ``test`` for an entity / document key (seeded, stable)."""
        u = _bucket(self.seed, *key)
        return "train" if u >= self.held_out else ("val" if u < self.held_out / 2 else "test")

    def _documents(self) -> dict[str, list[Document]]:
        if self.corpus == "bold":
            assert self.root is not None
            train, held, stats = bold_corpus(self.root, self.bold_domains,
                                             lambda d, e: self.held_out_split(d, e) != "train")  # fmt: skip
            self.stats.update(stats)
            in_val = [self.held_out_split(*d.id.split("/", 1)) == "val" for d in held]
            return {"train": train, "val": [d for d, v in zip(held, in_val, strict=True) if v],
                    "test": [d for d, v in zip(held, in_val, strict=True) if not v]}  # fmt: skip
        assert self.corpus_path is not None
        path = Path(self.corpus_path)
        if self.corpus == "wikitext":
            files = {s: path / f"wiki.{name}.raw" for s, name in zip(SPLITS, ("train", "valid", "test"), strict=True)}
            missing = [str(f) for f in files.values() if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"WikiText raw files not found: {', '.join(missing)}. Fix: set `data.corpus_path` to the folder "
                    "of wikitext-2-raw-v1 or wikitext-103-raw-v1 (wiki.train.raw, wiki.valid.raw, wiki.test.raw)."
                )
            return {s: read_wikitext(f) for s, f in files.items()}
        if not path.is_file():
            raise FileNotFoundError(f"data.corpus_path {path} not found (a {self.corpus} file)")
        if self.corpus == "jsonl":
            docs = read_jsonl(path, group_field=self.group_field)
        else:
            docs = read_plain_text(path)
        out: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for doc in docs:
            out[self.held_out_split(doc.id)].append(doc)
        return out

    def load_splits(self) -> dict[str, Dataset]:
        """Reads the corpus, packs it into blocks (and counterfactuals) and returns the three splits."""
        docs = self._documents()
        names = self.group_names
        unknown = sorted({d.group for split in docs.values() for d in split} - set(names))
        if unknown:
            raise ValueError(f"{self.corpus_path}: groups {unknown} are not in data.groups {names}")
        swap = None
        if self.cda:
            from dplit.text.cda import WordSwapper

            swap = WordSwapper(self.cda_word_files, self.cda_name_files).swap
        tok = self.tokenizer

        def encode(texts: list[str]) -> list[list[int]]:
            return tok(texts, add_special_tokens=False)["input_ids"]

        splits: dict[str, Dataset] = {}
        for split in SPLITS:
            x, y, owner = pack_sentences(docs[split], encode, self.block_size, int(tok.pad_token_id),
                                         counterfactual=swap if split == "train" else None)  # fmt: skip
            group = [names.index(docs[split][d].group) for d in owner]
            if split == "train" and self.limit_train is not None:
                x, y, group = x[: self.limit_train], y[: self.limit_train], group[: self.limit_train]
            if len(x) == 0:
                raise ValueError(f"LMCorpusDataModule: the {split} split has no blocks; lower data.held_out or "
                                 "use a larger corpus")  # fmt: skip
            splits[split] = GroupedTensorDataset(x, y, torch.tensor(group, dtype=torch.int64))
            self.stats[f"{split}_blocks"] = len(x)
            self.stats[f"{split}_documents"] = len(docs[split])
        log.info("LM corpus %s: %s", self.corpus, self.stats)
        return splits
