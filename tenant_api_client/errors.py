"""Errors of the tenant directory, mapped at the edge so callers see only these.

    DirectoryError
    ├── Unavailable       temporary: API down, slow, 5xx, file unreadable; SMTP 451 4.4.3
    ├── InvalidResponse   the answer could not be decoded; treated as Unavailable by callers
    └── InvalidData       the tenants file (or a record) breaks the documented format

"Not found" is not an error: lookups return an `Unknown` answer instead, because an
unknown recipient is an ordinary, cacheable outcome.
"""

from __future__ import annotations


class DirectoryError(Exception):
    """Base of every tenant directory error."""


class Unavailable(DirectoryError):
    """The directory cannot answer now; the caller must defer, never reject."""


class InvalidResponse(Unavailable):
    """The directory answered something we could not decode."""


class InvalidData(DirectoryError):
    """The tenant data breaks the format; `problems` lists (key, line, message)."""

    def __init__(self, problems: list[tuple[str, int | None, str]]) -> None:
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in tenant data")

    def render(self, source: str) -> str:
        return "\n".join(
            f"{source}: {'line ' + str(line) + ': ' if line else ''}{key}: {message}"
            for key, line, message in self.problems
        )
