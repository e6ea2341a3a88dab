"""Errors that reach the user as one line and an exit code, never as a traceback."""

from __future__ import annotations


class BaconError(Exception):
    """Base class: the message names the problem and the fix."""

    exit_code = 2


class ConfigError(BaconError):
    """A flag, config file or combination of settings that cannot work."""


class DataError(BaconError):
    """A dataset that is missing, unreadable or malformed."""
