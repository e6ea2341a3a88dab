"""Errors that reach the user as one line and an exit code, never as a traceback."""

from __future__ import annotations

import sys
from typing import Callable


class BaconError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code = 2


class ConfigError(BaconError):
    """A flag, config file or combination of settings that cannot work."""


class DataError(BaconError):
    """A dataset that is missing, unreadable or malformed."""


def exit_code_of(prog: str, action: Callable[[], object]) -> int:
    """Run a command's ``action``; a BaconError becomes one line on stderr and its exit code."""
    try:
        action()
    except BaconError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    return 0
