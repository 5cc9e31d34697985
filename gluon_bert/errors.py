"""One error type per kind of failure a user can fix.

Every error the package raises for bad input, bad settings or a bad environment derives from
`GluonBertError`; `gluon-bert` prints it as one line, `gluon-bert <command>: error: ...`, and
exits with code 2. Anything else that escapes is a bug and keeps its traceback.

Messages name the file (and the line, where there is one) and say what to do.
"""
from __future__ import annotations

__all__ = ['GluonBertError', 'ConfigError', 'DataError', 'MissingFileError', 'CheckpointError', 'RunFolderError',
           'TrainingDiverged']


class GluonBertError(Exception):
    """A failure the user can act on; the CLI shows its message without a traceback."""


class ConfigError(GluonBertError, ValueError):
    """A setting that cannot work (a flag, a preset, a device list, a resume conflict)."""


class DataError(GluonBertError, ValueError):
    """An input file that cannot be read or holds nothing usable; names the file and line."""


class MissingFileError(DataError, FileNotFoundError):
    """An input file or folder that is not there (still a FileNotFoundError, for callers
    that test for one, such as a missing SNLI train split)."""


class CheckpointError(GluonBertError, RuntimeError):
    """A checkpoint or run folder that is missing, corrupt or made for something else."""


class RunFolderError(GluonBertError, OSError):
    """A run folder that another run holds, or that cannot be written."""


class TrainingDiverged(GluonBertError, ArithmeticError):
    """A loss turned NaN or infinite; the run stopped at its last finite checkpoint."""
