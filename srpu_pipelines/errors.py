"""Errors a user can fix, as opposed to bugs.

``srpu`` prints a :class:`UserError` in one line (the message names the file, the key or
the command that fixes it) and exits 2; any other exception keeps its traceback, because
it is a defect to report, not a mistake to correct. Each class also derives from the
built-in error it refines, so ``except ValueError`` still catches an :class:`InputError`.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad input, a missing file, a wrong setting."""


class InputError(UserError, ValueError):
    """An input (a file, a value, a setting) that SRPU cannot use as it is."""


class MissingError(UserError, FileNotFoundError):
    """A file or folder that has to exist first (usually another step makes it)."""


class RegistryError(UserError, RuntimeError):
    """The model registry could not be read or written (not: "not found")."""


class DvcError(UserError, RuntimeError):
    """A DVC command failed (not: "no remote is configured")."""


class NotFoundError(UserError, LookupError):
    """Something the registry or a lookup does not hold yet (a model alias, a name)."""


class UnknownNameError(UserError, KeyError):
    """A name (an encoder, an architecture, a strategy) that is not one of the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class DivergedError(UserError, FloatingPointError):
    """Training's loss became NaN or infinite: a setting (the learning rate) to change."""
