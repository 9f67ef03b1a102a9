"""Every error a user can cause, under one base the command line catches.

A ``PipelineError`` is the user's to fix (a config value, an input file, a submission); its message
names the file, key, column or id at fault and what to do. The CLI prints it as ``error: ...`` and
exits with 2; ``--debug`` shows the traceback as well. Any other exception is a bug in the pipeline.
"""
from __future__ import annotations


class PipelineError(ValueError):
    """Base of every error caused by the user's input; the message says what to change."""


class ConfigError(PipelineError):
    """A config file, key or value that cannot be used."""


class InputError(PipelineError):
    """Bad competition input or missing artifacts of an earlier stage."""


class SubmissionError(PipelineError):
    """A submission the leaderboard would reject."""


class LeaderboardError(PipelineError):
    """Bad leaderboard input (unknown experiment, a score that is not a number, a newer schema)."""


class UnsafeCheckpoint(InputError):
    """A checkpoint that holds pickled objects or code: never loaded, never silently replaced."""
