"""What the milter gathered about one message: the input of every role's decision."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class MessageFacts:
    listener: str | None = None
    sasl_user: str | None = None
    envelope_sender: str = ""
    recipients: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)  # only the ones a rule reads

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def first_header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None
