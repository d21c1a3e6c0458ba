"""What the milter gathered about one message: the input of every role's decision."""

from __future__ import annotations

from dataclasses import dataclass, field

from mailgate.config import Config

BODY_LIMIT = 10 * 1024 * 1024  # a delivery report is small; the rest of a huge one is not needed


@dataclass
class MessageFacts:
    """`config` is the configuration in force when the message began (MAIL FROM): a reload
    during the message changes the next one, never this one half-way. (Built without one, as
    tests do, the runtime's current configuration serves: `config_for`.)"""

    config: Config | None = None
    listener: str | None = None
    sasl_user: str | None = None
    envelope_sender: str = ""
    recipients: list[str] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)  # only the ones a rule reads
    inbound: bool | None = None        # decided at the first header, once the envelope is known
    all_headers: list[tuple[str, str]] = field(default_factory=list)  # inbound only: for the report parser
    body: bytearray = field(default_factory=bytearray)                # inbound only, up to BODY_LIMIT

    def config_for(self, current: Config) -> Config:
        return self.config if self.config is not None else current

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [value for key, value in self.headers if key.lower() == name]

    def first_header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def add_body(self, chunk: bytes) -> None:
        room = BODY_LIMIT - len(self.body)
        if room > 0:
            self.body += chunk[:room]

    def raw_message(self) -> bytes:
        """The message as the parser reads it: every header, a blank line, the body kept."""
        head = "".join(f"{name}: {value}\r\n" for name, value in self.all_headers)
        return head.encode("utf-8", "surrogateescape") + b"\r\n" + bytes(self.body)
