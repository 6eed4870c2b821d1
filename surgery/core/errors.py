"""Every user-facing error of the library, one class per kind.

The command layer maps ``exit_code`` to the process exit status: 1 a check or policy
failed, 2 a usage error, 3 an input error (unreadable, corrupt or incompatible
checkpoint). Messages are one sentence that names the file and tensor at fault and,
where there is one, the fix.
"""

from __future__ import annotations

from pathlib import Path


class SurgeryError(Exception):
    """Base class of every expected error.

    Args:
        message: One sentence saying what failed, where, and how to fix it.
        path: The file or folder at fault, if any.
        tensor: The tensor at fault, if any.
    """

    exit_code = 3

    def __init__(self, message: str, *, path: str | Path | None = None, tensor: str | None = None):
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None
        self.tensor = tensor

    def __str__(self) -> str:
        return self.message


class UsageError(SurgeryError):
    """A flag combination or parameter value that cannot work (exit 2)."""

    exit_code = 2


class OutputExistsError(UsageError):
    """The output exists and overwriting was not asked for."""


class InputError(SurgeryError):
    """An input that cannot be used: unreadable, corrupt or incompatible (exit 3)."""

    exit_code = 3


class CheckpointNotFoundError(InputError):
    """No checkpoint at the given location."""


class CorruptCheckpointError(InputError):
    """A safetensors header or index that violates the format."""


class UnsafeFormatError(InputError):
    """A pickle-based file (.bin/.pt) given where safetensors is required."""


class ConvertFirstError(InputError):
    """A checkpoint in a format only ``surgery convert`` reads (GGUF) given to another command."""


class IncompatibleCheckpointsError(InputError):
    """Checkpoints whose tensor names, shapes or dtypes disagree."""


class HubError(InputError):
    """The Hugging Face Hub could not serve or accept a checkpoint."""


class OutputError(SurgeryError):
    """The output could not be written (full disk, read-only folder, ...); nothing was (exit 3)."""

    exit_code = 3


class ClusterError(SurgeryError):
    """The Ray cluster could not run the work: unreachable, or a unit kept failing (exit 3).
    A write's finished units are kept, so running the same command again resumes it."""

    exit_code = 3


class NonFiniteError(InputError):
    """An output tensor came out NaN or infinite (exit 3); names the input tensor that carried it."""


class CheckFailedError(SurgeryError):
    """A check or policy failed (exit 1): validation, collapse, drift.

    Args:
        message: What failed.
        report: The structured report that led to the verdict, if any.
    """

    exit_code = 1

    def __init__(self, message: str, *, report: dict | None = None, **kw):
        super().__init__(message, **kw)
        self.report = report
