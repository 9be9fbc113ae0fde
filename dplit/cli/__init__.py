"""The ``dplit`` command line: LightningCLI subcommands (fit/validate/test/predict) and dplit's own commands.

- ``dplit.cli.main``: the entry point (``dplit = dplit.cli:main``), dispatch and error messages;
- ``dplit.cli.lightning``: ``DplitCLI``, LightningCLI with dplit's defaults;
- ``dplit.cli.errors``: one short message per command-line or config mistake;
- ``dplit.cli.quiet``: console noise the user cannot act on, silenced.

Subcommands (``epsilon``, ``report``, ``audit``) live in their own packages and are imported by name when run, so
``dplit.audit.cli`` can use ``DplitCLI`` without an import cycle.
"""

from dplit.cli.lightning import DplitCLI
from dplit.cli.main import main

__all__ = ["DplitCLI", "main"]
