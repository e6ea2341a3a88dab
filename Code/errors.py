"""Errors that reach the user as one line and an exit code, never as a traceback."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Callable


class BaconError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code = 2

    def describe(self, prog: str) -> str:
        return f"{prog}: error: {self}"


class ConfigError(BaconError):
    """A flag, config file or combination of settings that cannot work."""


class DataError(BaconError):
    """A dataset that is missing, unreadable or malformed."""


class NonFiniteError(BaconError):
    """A loss, gradient or synthetic image became NaN or inf; the last good checkpoint is kept."""

    exit_code = 3


class Interrupted(BaconError):
    """SIGINT or SIGTERM: the current step was finished and a checkpoint written."""

    def __init__(self, signum: int, where: str = "", run_dir: Path | None = None) -> None:
        super().__init__(signum)
        self.signum, self.where, self.run_dir = signum, where, run_dir
        self.exit_code = 128 + signum

    def __str__(self) -> str:
        return f"stopped by {signal.Signals(self.signum).name}{self.where}"

    def describe(self, prog: str) -> str:
        if self.run_dir is None:
            return f"{prog}: {self}, before any checkpoint; start it again"
        return f"{prog}: {self}; checkpoint saved; resume with: python {prog} --resume {self.run_dir}"


def exit_code_of(prog: str, action: Callable[[], object], quiet: bool = False) -> int:
    """Run a command's ``action``; a BaconError becomes one line on stderr (unless ``quiet``: another
    process says it) and its exit code."""
    try:
        action()
    except BaconError as error:
        if not quiet:
            print(error.describe(prog), file=sys.stderr)
        return error.exit_code
    return 0
