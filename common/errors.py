"""Errors that are the person's to fix (a config value, a missing input, a resume with nothing to
train). The entry points print their message alone, without a traceback, and exit with code 2; every
other exception keeps its traceback (``run.cli.entry_point``)."""

from __future__ import annotations


class UsageError(Exception):
    """A mistake in what was asked for, whose message says what to set."""


class ConfigError(UsageError, ValueError):
    """A config value that cannot work (a bad choice, a conflict, a limit already reached)."""


class MissingInputs(UsageError, FileNotFoundError):
    """Input paths that are unset or do not exist, all of them in one message."""
