"""``DplitCLI``: LightningCLI with dplit's defaults (seeded runs, run summary, outputs under default_root_dir)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import LightningCLI

from dplit.callbacks.progress import VersionProgressBar, VersionRichProgressBar
from dplit.callbacks.summary import RunSummary
from dplit.checkpoints import check_checkpoint
from dplit.cli.errors import CLIUsageError, explain
from dplit.cli.quiet import quiet_console


class DplitCLI(LightningCLI):
    """LightningCLI with dplit defaults: seeded runs, any LightningModule/DataModule by ``class_path``.

    On top of LightningCLI:

    - a command-line or config mistake raises ``CLIUsageError`` with one short message naming the key and the
      closest valid ones (``dplit.cli.errors``), instead of printing the usage and exiting;
    - a logger without ``save_dir`` writes under ``trainer.default_root_dir``, so ``--trainer.default_root_dir DIR``
      moves all of a run's outputs;
    - ``dplit.callbacks.RunSummary`` is added unless the config lists one (end-of-run table and ``summary.json``),
      and the progress bar's ``v_num`` is the run's ``version_N``, not the W&B run id.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        quiet_console()
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False, "exit_on_error": False})
        # the optimizer and scheduler are the task's own arguments (`model.init_args.optimizer`): one way only
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Derived sizes come from the data, never written twice: the backbone's ``num_classes`` is the
        DataModule's, and so is ``in_features`` for tabular data (a backbone or DataModule without them is left
        alone)."""
        parser.link_arguments(
            "data.num_classes", "model.init_args.backbone.init_args.num_classes", apply_on="instantiate"
        )
        # tabular data: the encoded input width (data.num_features) is the backbone's in_features
        parser.link_arguments(
            "data.num_features", "model.init_args.backbone.init_args.in_features", apply_on="instantiate"
        )

    def parse_arguments(self, parser: Any, args: Any) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as err:
            raise CLIUsageError(explain(str(err), _option_strings(parser, args))) from None
        # LightningCLI reads hparams from `ckpt_path` right after parsing: check the file first, clearly
        check_checkpoint(self._section().get("ckpt_path"))

    def _section(self) -> Namespace:
        """The config of the subcommand being run (the whole config when ``run=False``)."""
        subcommand = self.config.get("subcommand")
        section = self.config.get(subcommand) if subcommand else self.config
        return section if section is not None else Namespace()

    def before_instantiate_classes(self) -> None:
        trainer = self._section().get("trainer")
        if trainer is None:
            return
        root = trainer.get("default_root_dir") or str(Path.cwd())
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init_args = logger.get("init_args") if isinstance(logger, Namespace) else None
            if isinstance(init_args, Namespace) and "save_dir" in init_args and init_args.get("save_dir") is None:
                init_args["save_dir"] = str(root)

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        config_init = self.config_init.get(self.subcommand) if self.subcommand else self.config_init
        trainer_init = config_init.get("trainer") or Namespace()
        callbacks = kwargs.pop("callbacks", trainer_init.get("callbacks"))
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        # the progress bar first: its teardown stops the live display before RunSummary prints in its own teardown
        callbacks = self._progress_bar(callbacks, trainer_init) + callbacks + self._summary(callbacks)
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def _summary(self, given: list[Callback]) -> list[Callback]:
        """A RunSummary unless the config lists one; either way it learns the run's config files."""
        listed = [cb for cb in given if isinstance(cb, RunSummary)]
        summaries = listed or [RunSummary()]
        for summary in summaries:
            summary.config_files = [str(path) for path in (self._section().get("config") or [])]
        added: list[Callback] = [] if listed else [*summaries]
        return added

    @staticmethod
    def _progress_bar(given: list[Callback], trainer_init: Namespace) -> list[Callback]:
        """Lightning's default bar (rich when installed) with ``v_num`` = version_N, unless one is configured."""
        if trainer_init.get("enable_progress_bar") is False or any(isinstance(cb, ProgressBar) for cb in given):
            return []
        return [VersionRichProgressBar() if VersionRichProgressBar.available() else VersionProgressBar()]


def _option_strings(parser: Any, args: Any) -> list[str]:
    """Every ``--key`` of the subcommand being parsed (for "did you mean" hints)."""
    parsers = [parser]
    for action in getattr(parser, "_actions", []):
        choices = getattr(action, "choices", None)
        if isinstance(action, argparse._SubParsersAction) and isinstance(choices, dict):
            given = sys.argv[1:] if args is None else args
            names = [a for a in given if isinstance(a, str) and a in choices]
            parsers = [choices[names[0]]] if names else list(choices.values())
    actions = [a for p in parsers for a in getattr(p, "_actions", [])]
    return [opt for a in actions for opt in a.option_strings if opt.startswith("--")]
