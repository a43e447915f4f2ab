"""The one exception type for bad input files."""

from __future__ import annotations

import os


class ProtfoldInputError(ValueError):
    """A structure, MSA or cache file that cannot be used. Carries the file name and a one-line reason."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
