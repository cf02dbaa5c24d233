"""Every error meant for a user, in one place: a :class:`UserError` says what is wrong in one line, naming the file,
line, key or field at fault; it is never a bug.

The command line prints a :class:`UserError` as ``mmsenti: error: <message>`` and exits with its
:attr:`~UserError.exit_code` (2, or 1 where the command ran and found a failure); the service answers it with a
4xx (:class:`ServeError` carries its own status and field). Both do so in one place (``mmsenti.cli.main`` and
``mmsenti.serve.errors``). Each class is also importable from the module that raises it most (``ConfigError`` from
:mod:`mmsenti.config`, ``DataError`` from :mod:`mmsenti.data.base`, ...).

This module imports nothing: every layer may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """An error the user can act on (bad config, data, files or request); the message is one line."""

    exit_code = 2  # what `mmsenti` exits with after printing it


class UsageError(UserError):
    """A command line that argparse accepts but that cannot run as given (e.g. ``--resume`` without ``--out``)."""


# ---------------------------------------------------------------------------------------------------- config
class ConfigError(UserError, ValueError):
    """A bad config: unknown key, wrong type, missing file. The message is one line naming the culprit."""


class RegistryError(UserError, KeyError):
    """An unknown or twice-registered name of a model, dataset or backbone."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class WeightsError(ConfigError):
    """Pretrained weights that cannot be used: unreadable, or not fitting the architecture they are loaded into."""


class MissingWeightsError(WeightsError):
    """Pretrained weights that were asked for but are not available (offline and not found locally)."""


# ------------------------------------------------------------------------------------------------------ data
class DataError(UserError, ValueError):
    """Bad or missing data; the message names the file, line or field."""


class ModelFileError(DataError):
    """A saved model folder with a missing or damaged file; the message names the file and the problem."""


class CheckpointError(DataError):
    """A checkpoint that cannot be read, or that holds objects mmsenti refuses to unpickle."""


class RunDirLocked(DataError):
    """Another process holds the run directory."""


class CacheError(DataError):
    """A frozen-feature cache entry that cannot serve a batch (e.g. it disagrees with the tokenization)."""


class ExportError(DataError):
    """A model or configuration that cannot be exported, or an export that failed; the message says why."""


class ParityError(ExportError):
    """The exported graph does not answer as the PyTorch model does (or ``--check`` does not reproduce figures)."""

    exit_code = 1  # the export ran; its check failed


# -------------------------------------------------------------------------------------------- processes, service
class ProcessGroupError(UserError, RuntimeError):
    """This process lost the others: one died, was stopped, or stopped on an error of its own. The message says
    which, and how to continue the run when resuming can help (see ``Distributed.failure_message``)."""

    exit_code = 1


class ServeError(UserError):
    """A client error of the service: HTTP ``status``, the request ``field`` at fault (``None`` for the request as
    a whole)."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message
