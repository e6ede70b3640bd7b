"""The one exception every loader raises for a missing or malformed data file."""

from __future__ import annotations

from os import PathLike


class DatasetError(ValueError):
    """A data file or folder is missing or not in the expected format.

    The message always names the offending path and says what was expected, so a user can fix the
    input without reading the loader's source.
    """

    def __init__(self, path: str | PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
