"""Typed exceptions. Each carries an actionable message and the CLI exit code it maps to."""

from __future__ import annotations


class AutomlAdError(Exception):
    """Base class for errors a user can act on."""

    exit_code = 1


class UsageError(AutomlAdError):
    """Bad command-line arguments or configuration files (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """A constraint profile or other configuration file is invalid."""


class InvalidParameterError(UsageError, ValueError):
    """A detector parameter is outside what its family accepts (the message names family, parameter, value)."""


class InvalidDatasetError(AutomlAdError):
    """The dataset cannot be used as it is (exit code 3). ``problems`` lists every issue found."""

    exit_code = 3

    def __init__(self, message: str, problems: list | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


class DataChangedError(InvalidDatasetError):
    """The images a search used are gone or changed since the search, so its models cannot be calibrated or scored
    on them as they were (exit code 3). ``problems`` lists the files."""
