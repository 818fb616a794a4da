"""Domain errors raised by segflu.

Every error that a user can cause and fix derives from :class:`SegfluError`,
so the command line and the app can catch this one family and show its
message. Messages name the file, line and offending text where there is one,
and tell what to do next.
"""

from __future__ import annotations


class SegfluError(Exception):
    """Base class for errors caused by user input or project state."""


class ConllFormatError(SegfluError, ValueError):
    """A CoNLL, JSON Lines or dataset file cannot be read as annotated tokens.

    Attributes
    ----------
    path : str or None
        The file that failed.
    line : int or None
        1-based line number of the offending line, where there is one.
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None):
        location = ""
        if path is not None:
            location = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(location + message)
        self.path = path
        self.line = line


class TagSchemeError(SegfluError, ValueError):
    """A tag or tag sequence does not fit the tag scheme (IOB1, IOB2, BIOES)."""


class EncoderNotFoundError(SegfluError):
    """The requested encoder is neither a local folder nor a cached Hugging Face model."""


class ProjectError(SegfluError):
    """A project folder is missing, incomplete or inconsistent."""


class IndexNotBuiltError(ProjectError):
    """An operation needs the influence index, and it has not been built."""


class UnsafePathError(SegfluError, ValueError):
    """A path points outside the folder it must stay in."""


class EditStoreError(SegfluError):
    """The edit database cannot be opened or written."""


class EditConflictError(SegfluError, ValueError):
    """An edit cannot be undone on its own because a later edit changed the same tokens."""


class ExportTargetExistsError(SegfluError, FileExistsError):
    """An export would replace an existing file, and overwriting was not requested."""


class ReproductionDataError(SegfluError):
    """A corpus that a ``segflu reproduce`` experiment reads is missing."""


class OutputPathError(SegfluError, FileNotFoundError):
    """An output file cannot be written where it was asked for, such as in a missing folder."""
