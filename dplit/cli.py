"""``dplit`` command line: LightningCLI subcommands (fit/validate/test/predict) plus ``dplit epsilon``."""

from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any

from lightning.pytorch.cli import LightningCLI

from dplit.checkpoints import check_checkpoint

# jsonargparse 4.x warns about APIs Lightning's cli.py still uses (removal planned for jsonargparse 5, pinned <5).
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"jsonargparse.*")
warnings.filterwarnings("ignore", message=r".*LightningCLI.*jsonargparse.*")

EXTRA_COMMANDS = {
    "epsilon": "Privacy calculator: epsilon for a DP-SGD configuration, or the noise for a target epsilon.",
    "report": "Disparate-impact report: per-group privacy cost of DP runs vs their non-DP twin (PNG + markdown).",
    "audit": "Empirical privacy audit in one training run: a lower bound on epsilon from mislabelled canaries.",
}


class DplitCLI(LightningCLI):
    """LightningCLI with dplit defaults: seeded runs, any LightningModule/DataModule by ``class_path``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"default_env": False})
        super().__init__(*args, **kwargs)

    def parse_arguments(self, parser: Any, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads hparams from `ckpt_path` right after parsing: check the file first, clearly
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        if config is not None:
            check_checkpoint(config.get("ckpt_path"))


def _usage_extra() -> str:
    lines = ["", "Other commands:"] + [f"  {name:<10} {text}" for name, text in EXTRA_COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dplit`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "epsilon":
        from dplit.epsilon import main as epsilon_main

        return epsilon_main(args[1:])
    if args and args[0] == "report":
        from dplit.report.cli import main as report_main

        return report_main(args[1:])
    if args and args[0] == "audit":
        from dplit.audit.cli import main as audit_main

        return audit_main(args[1:])
    if not args or args[0] in ("-h", "--help"):
        os.environ.setdefault("COLUMNS", "120")
    try:
        DplitCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except (ValueError, FileNotFoundError) as err:
        # dplit's errors name the field and the fix; the traceback would bury that (DPLIT_TRACEBACK=1 shows it)
        if os.environ.get("DPLIT_TRACEBACK"):
            raise
        print(f"dplit: error: {_plain_message(err)}\n(set DPLIT_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 2
    except SystemExit as exc:
        if not args or args[0] in ("-h", "--help"):
            print(_usage_extra())
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    return 0


def _plain_message(err: Exception) -> str:
    """The error to show: for a class that failed to build inside jsonargparse's union-type check (e.g. a backbone
    naming a missing package or file), that class's own message instead of the whole type report."""
    text = str(err)
    report = re.search(r"\nErrors:\n(.*?)(?:\nGiven value type:|\Z)", text, re.S)
    if "Does not validate against any of the Union subtypes" not in text or report is None:
        return f"{type(err).__name__}: {text}"
    entries = [e for e in re.split(r"(?:^|\n)  - ", report.group(1)) if e.strip()]
    entries = [e for e in entries if not e.startswith("Expected a <class 'NoneType'>")] or entries
    first = " ".join(line.strip() for line in entries[0].splitlines() if line.strip())
    return re.sub(r"^Problem with given class_path '([^']+)': ", r"\1: ", first)


if __name__ == "__main__":
    sys.exit(main())
