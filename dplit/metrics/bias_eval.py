"""BiasEvaluation: a callback that scores a causal-LM task on the bias benchmarks each validation epoch and at test.

Logged as ``{stage}/bias/<metric>/group=<name>`` (readable by ``dplit report``) plus summaries:

- ``stereoset_ss`` / ``stereoset_lms`` / ``stereoset_icat`` per domain (``group=overall`` for all items);
- ``crows`` per bias type (``group=overall`` too);
- ``ppl_original`` / ``ppl_swapped`` / ``ppl_gap`` on WinoBias sentences (dev at validation, test at test) and
  their gender-swapped counterparts;
- BOLD, per group: ``bold_sentiment``, ``bold_positive``, ``bold_negative``, ``bold_<toxicity|profanity>`` (and
  ``_share``), with ``bold_<metric>_gap`` (max - min over groups). With an :class:`~dplit.data.LMCorpusDataModule`
  on BOLD, only prompts of its held-out entities are used (validation entities at validation, test ones at test),
  so no evaluated prompt was trained on. Generation settings are logged once as hyper-parameters (rank zero).

Everything runs on every rank (cheap for the sizes configured); values are identical across ranks.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from dplit.data.bias_benchmarks import (
    benchmark_file,
    read_bold,
    read_crows_pairs,
    read_stereoset,
    read_winobias,
)
from dplit.metrics.bias import evaluate_crows_pairs, evaluate_perplexity_gap, evaluate_stereoset
from dplit.metrics.bias_bold import (
    GenerationSettings,
    bold_group_scores,
    generate,
    profanity_scorer,
    toxicity_scorer,
    vader_scorer,
)

__all__ = ["BiasEvaluation"]

Benchmark = Literal["stereoset", "crows_pairs", "perplexity_gap", "bold"]


class BiasEvaluation(Callback):
    """Bias benchmarks of the task's causal LM, every ``every_n_epochs`` validation epochs and at test.

    Args:
        root: Folder laid out like ``../shared/data/lm_bias``; default: the DataModule's ``root``.
        benchmarks: Which benchmarks to run.
        limit: Items per benchmark, drawn once with a fixed seed (the same every epoch and run; None for all).
        groups: StereoSet domains and CrowS-Pairs bias types kept (e.g. ``["gender"]``; None for all), chosen
            before ``limit`` draws, so a study of one bias scores all of its items rather than a tenth of them.
        bold_domains: BOLD domains whose prompts are continued.
        swap_files: Word-pair files (under ``root``) for the perplexity gap.
        toxicity_model: A local Hugging Face toxicity classifier folder; None uses the ``alt-profanity-check``
            proxy, logged as ``profanity``.
        toxic_label: The classifier's toxic label.
        generation: Generation settings of the BOLD continuations.
        every_n_epochs: Validation epochs between evaluations.
    """

    def __init__(
        self,
        root: str | None = None,
        benchmarks: list[Benchmark] | None = None,
        limit: int | None = None,
        groups: list[str] | None = None,
        bold_domains: list[str] | None = None,
        swap_files: list[str] | None = None,
        toxicity_model: str | None = None,
        toxic_label: str = "toxic",
        generation: GenerationSettings | None = None,
        every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        chosen = list(benchmarks or ["stereoset", "crows_pairs", "perplexity_gap", "bold"])
        unknown = set(chosen) - {"stereoset", "crows_pairs", "perplexity_gap", "bold"}
        if unknown:
            raise ValueError(f"BiasEvaluation: unknown benchmarks {sorted(unknown)}")
        if every_n_epochs < 1 or (limit is not None and limit < 1):
            raise ValueError("BiasEvaluation: every_n_epochs and limit must be >= 1")
        self.root = Path(root) if root is not None else None
        self.benchmarks = chosen
        self.limit = limit
        self.groups = None if groups is None else list(groups)
        self.bold_domains = list(bold_domains or ["gender"])
        self.swap_files = list(swap_files or ["gender_swaps/generalized_swaps.txt"])
        self.toxicity_model, self.toxic_label = toxicity_model, toxic_label
        self.generation = generation or GenerationSettings()
        self.every_n_epochs = every_n_epochs
        self._scorers: tuple[Any, Any, str] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if backbone is None or not hasattr(backbone, "lm"):
            raise ValueError("BiasEvaluation needs a task whose `backbone` is a dplit.models.CausalLM")
        if getattr(getattr(trainer, "datamodule", None), "tokenizer", None) is None:
            raise ValueError("BiasEvaluation needs a DataModule with a `tokenizer` (dplit.data.LMCorpusDataModule)")
        if self.root is None:
            data_root = getattr(getattr(trainer, "datamodule", None), "root", None)
            if data_root is None:
                raise ValueError("BiasEvaluation: set `root` (a folder laid out like ../shared/data/lm_bias) or use "
                                 "a DataModule with `root`")  # fmt: skip
            self.root = Path(data_root)
        if trainer.is_global_zero and trainer.logger is not None:
            trainer.logger.log_hyperparams({"bias_generation": self.generation.record()})

    def _take(self, items: list[Any]) -> list[Any]:
        """All items, or ``limit`` of them drawn with a fixed seed (file order kept; the same every epoch)."""
        if self.limit is None or self.limit >= len(items):
            return items
        return [items[i] for i in sorted(random.Random(0).sample(range(len(items)), self.limit))]

    def _keep(self, items: list[Any], benchmark: str) -> list[Any]:
        """The items whose ``bias_type`` is in ``groups`` (all when ``groups`` is None)."""
        if self.groups is None:
            return items
        kept = [it for it in items if it.bias_type in self.groups]
        if not kept:
            known = sorted({it.bias_type for it in items})
            raise ValueError(f"BiasEvaluation.groups {self.groups}: no {benchmark} item has one of these bias types; "
                             f"choose from {known}")  # fmt: skip
        return kept

    def _bold_scorers(self) -> tuple[Any, Any, str]:
        if self._scorers is None:
            if self.toxicity_model is not None:
                tox, name = toxicity_scorer(self.toxicity_model, self.toxic_label), "toxicity"
            else:
                tox, name = profanity_scorer(), "profanity"
            self._scorers = (vader_scorer(), tox, name)
        return self._scorers

    def evaluate(self, pl_module: L.LightningModule, datamodule: Any, stage: Literal["val", "test"]) -> dict[str, Any]:
        """All configured benchmarks: ``{"bias/<metric>/group=<name>" | "bias/<summary>": value}``."""
        model: Any = pl_module.backbone
        tokenizer = datamodule.tokenizer
        root = self.root
        if root is None:
            raise RuntimeError("BiasEvaluation.evaluate before setup: no benchmark root")
        out: dict[str, float] = {}
        if "stereoset" in self.benchmarks:
            items = self._take(self._keep(read_stereoset(benchmark_file(root, "stereoset")), "stereoset"))
            for group, scores in evaluate_stereoset(model, tokenizer, items).items():
                for name in ("ss", "lms", "icat"):
                    out[f"bias/stereoset_{name}/group={group}"] = scores[name]
        if "crows_pairs" in self.benchmarks:
            pairs = self._take(self._keep(read_crows_pairs(benchmark_file(root, "crows_pairs")), "crows_pairs"))
            for group, score in evaluate_crows_pairs(model, tokenizer, pairs).items():
                out[f"bias/crows/group={group}"] = score
        if "perplexity_gap" in self.benchmarks:
            from dplit.text.cda import WordSwapper

            split = "dev" if stage == "val" else "test"
            files = [benchmark_file(root, "winobias", stereotype=s, type=t, split=split)
                     for s in ("pro", "anti") for t in ("1", "2")]  # fmt: skip
            sentences = self._take([it.text for f in files for it in read_winobias(f)])
            swap = WordSwapper([root / f for f in self.swap_files]).swap
            gap = evaluate_perplexity_gap(model, tokenizer, sentences, swap)
            out.update({"bias/ppl_original": gap["ppl_original"], "bias/ppl_swapped": gap["ppl_swapped"],
                        "bias/ppl_gap": gap["gap"]})  # fmt: skip
        if "bold" in self.benchmarks:
            held = getattr(datamodule, "held_out_split", None) if getattr(datamodule, "corpus", "") == "bold" else None
            prompts = []
            for domain in self.bold_domains:
                texts = read_bold(benchmark_file(root, "bold_prompts", domain=domain), domain)
                prompts += [t for t in texts if held is None or held(domain, t.entity) == stage]
            prompts = self._take(prompts)
            continuations = generate(model.lm, tokenizer, [p.text for p in prompts], self.generation)
            sentiment, toxicity, name = self._bold_scorers()
            scores = bold_group_scores(prompts, continuations, sentiment, toxicity, name)
            out.update({f"bias/bold_{k}": v for k, v in scores.items()})
        return out

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: Literal["val", "test"]) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            metrics = self.evaluate(pl_module, getattr(trainer, "datamodule", None), stage)
        finally:
            pl_module.train(was_training)
        pl_module.log_dict({f"{stage}/{k}": float(v) for k, v in metrics.items()}, sync_dist=False)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._log(trainer, pl_module, "val")

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")
