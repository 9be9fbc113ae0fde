"""``python -m dplit.cli ...`` (also what Lightning relaunches for the other DDP ranks)."""

import sys

from dplit.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
