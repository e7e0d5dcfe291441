"""The errors a training run reports to its user: each one message that names the setting or folder and the fix."""

from __future__ import annotations


class TrainingConfigError(ValueError):
    """A training configuration that cannot run; the message names the setting and the fix."""


class TrainingOutOfMemoryError(RuntimeError):
    """Training ran out of memory; the message lists the knobs that lower the peak."""


class TrainingOutputError(RuntimeError):
    """The run folder cannot be written (permissions, a read-only or full disk); the message names it and why."""
