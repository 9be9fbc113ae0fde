"""``dplit`` entry point: dispatch to a subcommand, and print dplit's errors as one message with exit code 2."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

from dplit.cli.errors import CLIUsageError

COMMANDS: dict[str, tuple[str, str]] = {
    "epsilon": (
        "dplit.epsilon:main",
        "Privacy calculator: epsilon for a DP-SGD configuration, or the noise for a target epsilon.",
    ),
    "report": (
        "dplit.report.cli:main",
        "Disparate-impact report: per-group privacy cost of DP runs vs their non-DP twin (PNG + markdown).",
    ),
    "sweep": (
        "dplit.sweep.cli:main",
        "Grid of epsilons x seeds x DP algorithms (+ the non-DP twin), one run per cell; resumable; SLURM/W&B jobs.",
    ),
    "baseline": ("dplit.baselines.cli:main", "NON-private scikit-learn baselines on a config's data, as report runs."),
    "federate": (
        "dplit.federated.cli:main",
        "Federated learning with user-level DP (DP-FedAvg) on Flower, with per-user-group metrics.",
    ),
    "audit": (
        "dplit.audit.cli:main",
        "Empirical privacy audit in one training run: a lower bound on epsilon from mislabelled canaries.",
    ),
}
"""dplit's own subcommands: name -> ("module:function" taking argv and returning the exit code, help line)."""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
TRACEBACK_HINT = "(set DPLIT_TRACEBACK=1 for the traceback)"


def _load(target: str) -> Callable[[list[str]], int]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def _usage_extra() -> str:
    lines = ["", "Other commands:"] + [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def error_exit(message: str, traceback_hint: bool = True) -> int:
    """Prints ``dplit: error: message`` on stderr and returns 2."""
    hint = f"\n{TRACEBACK_HINT}" if traceback_hint else ""
    print(f"dplit: error: {message}{hint}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dplit`` console script; returns the exit code (2 for a mistake in the input).

    Run as a command (``argv`` None) with ``DPLIT_MALLOC_MMAP_THRESHOLD`` set, it first fixes glibc's mmap threshold
    (:mod:`dplit.cli.malloc`); a call from Python leaves its process's allocator alone.
    """
    if argv is None:
        from dplit.cli.malloc import tune_malloc

        try:
            tune_malloc()
        except ValueError as err:
            return error_exit(str(err), traceback_hint=False)
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in COMMANDS:
        return _load(COMMANDS[args[0]][0])(args[1:])
    if not args:
        commands = ",".join([*LIGHTNING_COMMANDS, *COMMANDS])
        print(f"usage: dplit [-h] {{{commands}}} ...\n\nLightning commands: {', '.join(LIGHTNING_COMMANDS)} "
              f"(`dplit fit --help`){_usage_extra()}", file=sys.stderr)  # fmt: skip
        return 2
    wants_help = args[0] in ("-h", "--help")
    if wants_help:
        os.environ.setdefault("COLUMNS", "120")
    elif not args[0].startswith("-") and args[0] not in LIGHTNING_COMMANDS:
        from dplit.cli.errors import did_you_mean

        choices = [*LIGHTNING_COMMANDS, *COMMANDS]
        return error_exit(
            f"unknown command `{args[0]}`{did_you_mean(args[0], choices)}; commands: {', '.join(choices)}",
            traceback_hint=False,
        )
    from dplit.cli.lightning import DplitCLI  # the Lightning stack only for Lightning subcommands

    try:
        DplitCLI(args=argv)  # None: LightningCLI reads sys.argv itself
    except CLIUsageError as err:
        if os.environ.get("DPLIT_TRACEBACK"):
            raise
        return error_exit(f"{err}\n(`dplit {args[0] if args else 'fit'} --help` lists every option)", False)
    except (ValueError, FileNotFoundError) as err:
        # dplit's errors name the field and the fix; the traceback would bury that (DPLIT_TRACEBACK=1 shows it)
        if os.environ.get("DPLIT_TRACEBACK"):
            raise
        return error_exit(plain_message(err))
    except SystemExit as exc:
        if wants_help:
            print(_usage_extra())
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    return 0


def plain_message(err: Exception) -> str:
    """The error to show: for a class that failed to build inside jsonargparse's union-type check (e.g. a backbone
    naming a missing package or file), that class's own message instead of the whole type report."""
    import re

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
