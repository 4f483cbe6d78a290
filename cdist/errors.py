"""The exceptions cdist raises for input a user can fix, one family so that a caller can catch them
all (``except CdistError``) and the command line can turn each into one line and exit status 2.

Every message is one line that names what is wrong and what to do. Each class is also a
``ValueError`` (``FileNotFoundError`` for a missing file), so code that caught those before still
does.

- ``ConfigError``: a setting out of range, of the wrong type, or not one of its choices.
- ``InputError``: data that cannot serve: too few items for a batch, heads outside a model, an
  unknown word list.
- ``MismatchError``: two things that must agree do not: a teacher and a student with other
  tokenizers, a model and the task its manifest names.
- ``FileFormatError``: a file that cannot be read as what it should be (it is named).
- ``RunFolderError``: an output folder that cannot be written, is in use by another process,
  holds results of another run, or holds files cdist did not write (it writes only in folders it
  made, ``cdist.run_folder``).
- ``WriteError``: a file that could not be written: the disk is full, a quota or an I/O error
  (named with the system's reason). No half-written file is left where a result goes.
- ``NumericsError``: a loss or gradient that stopped being finite during training (nothing is
  saved from that step).
- ``UnfaithfulCircuitError``: a circuit that does not do its model's task alone (its faithfulness
  on held-out items is below the threshold), or a model at or below chance on the task, whose
  circuit means nothing.
"""

from __future__ import annotations

__all__ = ["CdistError", "ConfigError", "FileFormatError", "InputError", "MismatchError",
           "MissingFileError", "NumericsError", "RunFolderError", "UnfaithfulCircuitError",
           "WriteError"]


class CdistError(Exception):
    """Input a user can fix; the message says what and how, in one line."""


class ConfigError(CdistError, ValueError):
    """A setting out of range, of the wrong type, or not one of its choices."""


class InputError(CdistError, ValueError):
    """Data that cannot serve as given."""


class MismatchError(CdistError, ValueError):
    """Two inputs that must agree (tokenizers, vocabularies, a model and its task) do not."""


class FileFormatError(CdistError, ValueError):
    """A file that exists but cannot be read as what it should be."""


class MissingFileError(CdistError, FileNotFoundError):
    """A file or folder that should be there is not."""


class RunFolderError(CdistError, ValueError):
    """An output folder that cannot be used as it is."""


class WriteError(CdistError, OSError):
    """A file that the system would not let cdist write (a full disk, a quota, an I/O error); an
    ``OSError`` too, with the system's ``errno``."""

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] ..." form of its errno
        return str(self.args[0]) if self.args else ""


class NumericsError(CdistError, ArithmeticError):
    """A loss or gradient that is not finite."""


class UnfaithfulCircuitError(InputError):
    """A circuit that cannot stand for its model: alone it keeps too little of the model's
    accuracy, or the model itself does no better than chance."""
