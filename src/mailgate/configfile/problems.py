"""What a loader hands back when the file is wrong: one problem per line, all of them at once.

A problem prints as `file:line: key: message` (warnings say so), the form editors and operators
can jump to, or `file: key: message` when no line is to blame (line 0: the file itself, a
default value); ConfigError carries every error and warning found in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    key: str
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        prefix = "" if self.severity == "error" else "warning: "
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {prefix}{self.key + ': ' if self.key else ''}{self.message}"


class ConfigError(Exception):
    """The file cannot be used; `problems` holds every error and warning found."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
