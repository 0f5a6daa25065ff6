"""Errors raised for bad input data.

Every error that comes from a file names the file and, where the format has lines, the line
(1-based), so a user can open the file at the right place. Loaders read and validate the whole
input before anything is written, so a bad record never leaves half an output behind.
"""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data: a malformed line, a missing column, an empty text, a wrong type.

    ``str(err)`` reads ``path:line: key: message`` with the parts that are known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        self.key = key
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"

    def located(self, path: str | Path | None = None, line: int | None = None) -> "DataError":
        """The same error with a file and line filled in (those already known are kept)."""
        return DataError(
            self.message,
            path=self.path if self.path is not None else path,
            line=self.line if self.line is not None else line,
            key=self.key,
        )
