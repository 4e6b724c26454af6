"""User-facing errors.

Anything a user can cause (a bad path, a wrong flag, a corrupt file) is raised as a ``UserError`` whose message
is one self-contained line. ``cli.py`` prints it to stderr and exits with status 2 — never a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ThresholdFailed(UserError):
    """A quality gate (``validate --max-cv`` ...) failed; exit 1 so CI can tell it from bad input."""

    exit_code = 1
