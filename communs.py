"""`communs` (and `python -m communs`): the command, defined in app/cli.py.

Kept as a top-level module so that `python -m communs` and `communs.main([...])` work from a checkout;
nothing of ours imports it. `UserError` lives in common/errors.py.
"""

from __future__ import annotations

import sys

from app.cli import main
from common.errors import UserError

__all__ = ["main", "UserError"]

if __name__ == "__main__":
    sys.exit(main())
