"""Errors meant for the person at the keyboard."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""
