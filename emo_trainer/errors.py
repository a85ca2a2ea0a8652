"""User errors: one base class, so that callers (the CLI) catch them all by type.

A :class:`UserError` is a mistake in what the user gave — a config key, a data file, an objective
option, a checkpoint path, too few texts for MAUVE — and its message names what to change.  The
CLI prints it as one ``error: ...`` line and exits with code 2; anything else is a bug and keeps
its traceback.  Each subclass stays importable from the module that raises it
(``emo_trainer.config.ConfigError``, ``emo_trainer.data.DataError``,
``emo_trainer.objectives.ObjectiveError``, ``emo_trainer.evaluation.metrics.mauve.MauveSampleError``).

They derive from ``ValueError`` too, so ``except ValueError`` written against older versions still works.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; the message says what to change."""


class ConfigError(UserError):
    """A user error in the configuration or the command line; the message names the key and the fix."""


class DataError(UserError):
    """Unusable data: missing files, empty dataset/column, text shorter than one block, bad encoding."""


class ObjectiveError(UserError):
    """Unknown objective, bad objective option, or an objective that cannot be set up on this model."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used: missing, incomplete, or not a model directory."""


class MauveSampleError(UserError):
    """Too few texts for a meaningful MAUVE score."""


__all__ = ["CheckpointError", "ConfigError", "DataError", "MauveSampleError", "ObjectiveError", "UserError"]
