"""Every module under dplit/ imports, and every name in every ``__all__`` exists (house style)."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import dplit


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(dplit.__path__, "dplit.") if not m.name.endswith("__main__"))


def test_every_name_in_every_all_exists():
    missing = []
    for name in _modules():
        module = importlib.import_module(name)
        missing += [f"{name}.{item}" for item in getattr(module, "__all__", []) if not hasattr(module, item)]
    assert not missing, missing


def test_cli_package_keeps_its_entry_points():
    """`dplit = dplit.cli:main`, `from dplit.cli import DplitCLI`, and the audit reaching DplitCLI with no cycle."""
    cli = importlib.import_module("dplit.cli")
    assert callable(cli.main) and cli.DplitCLI.__module__ == "dplit.cli.lightning"
    code = (
        "import sys, dplit.cli; assert 'dplit.audit' not in sys.modules, 'dplit.cli imports the audit'; "
        "import dplit.audit.cli; from dplit.cli.main import COMMANDS; "
        "assert COMMANDS['audit'][0] == 'dplit.audit.cli:main'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
