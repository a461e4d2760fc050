"""What every benchmark scenario produces: one section of the results (Markdown body + JSON data).

Scenarios are listed in :mod:`bench.registry`; a scenario whose feature does not exist yet still yields
its section, marked "not yet available" with the reason, so the results always have the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from bench.session import Session

NOT_YET = "not yet available"


@dataclass
class Section:
    key: str
    title: str
    available: bool
    markdown: str
    data: dict[str, Any] = field(default_factory=dict)
    summary: list[str] = field(default_factory=list)  # a few lines for the console at the end of a run

    @classmethod
    def pending(cls, key: str, title: str, rows: list[str], reason: str) -> "Section":
        """A section whose rows all read "not yet available", with why."""
        body = "| measurement | result |\n|---|---|\n" + "".join(f"| {row} | {NOT_YET} |\n" for row in rows)
        return cls(key, title, False, f"{body}\n{reason}\n", {"status": NOT_YET, "reason": reason, "rows": rows})


class Scenario(Protocol):
    key: str
    title: str

    def run(self, session: "Session") -> Section: ...
