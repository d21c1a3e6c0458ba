"""The policy delegation protocol's attributes (SMTPD_POLICY_README), apart from the server.

A request is `name=value` lines, LF only, ending with an empty line; a reply is
`action=<access(5) action>` and an empty line. This module reads one request's block into a
typed view and writes one action; the server (`mailgate.policy.policyd`) only frames blocks on
the connection and calls these.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

REQUEST_TYPE = "smtpd_access_policy"
DEFAULT_MAX_ATTRIBUTES = 128
"""Postfix 3.7 sends about 30 attributes; four times that leaves room for newer versions."""
LOG_SNIPPET = 80
"""How much of a malformed line the log quotes."""


class PolicyRequest(Mapping[str, str]):
    """One policy request: an immutable mapping of every attribute Postfix sent.

    Properties give the common attributes with Postfix's own convention for a missing value
    (empty string, or 0 for numbers), so handlers never need ``.get`` with defaults.
    """

    __slots__ = ("_attrs", "connection")

    def __init__(self, attrs: Mapping[str, str], connection: int = 0) -> None:
        self._attrs = dict(attrs)
        self.connection = connection
        """Which policy connection the request came on (the server numbers them from 1; 0 when
        unknown): Postfix sends a transaction's requests on one connection."""

    def __getitem__(self, name: str) -> str:
        return self._attrs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._attrs)

    def __len__(self) -> int:
        return len(self._attrs)

    def __contains__(self, name: object) -> bool:
        return name in self._attrs

    def get(self, name: str, default: str | None = None) -> str | None:  # type: ignore[override]
        return self._attrs.get(name, default)

    def __repr__(self) -> str:
        return f"PolicyRequest({self._attrs!r})"

    def _int(self, name: str) -> int:
        try:
            return int(self._attrs.get(name) or 0)
        except ValueError:
            return 0

    @property
    def protocol_state(self) -> str:
        """``CONNECT``, ``EHLO``, ``HELO``, ``MAIL``, ``RCPT``, ``DATA``, ``END-OF-MESSAGE``, ..."""
        return self._attrs.get("protocol_state", "")

    @property
    def protocol_name(self) -> str:
        return self._attrs.get("protocol_name", "")

    @property
    def sender(self) -> str:
        """The envelope sender as the client gave it ("" for the null sender)."""
        return self._attrs.get("sender", "")

    @property
    def recipient(self) -> str:
        return self._attrs.get("recipient", "")

    @property
    def recipient_count(self) -> int:
        """Accepted recipients; non-zero only at DATA and END-OF-MESSAGE."""
        return self._int("recipient_count")

    @property
    def queue_id(self) -> str:
        """Empty at RCPT time; set at end of data."""
        return self._attrs.get("queue_id", "")

    @property
    def instance(self) -> str:
        """Same value for every request about one message: the key to correlate them."""
        return self._attrs.get("instance", "")

    @property
    def sasl_username(self) -> str:
        return self._attrs.get("sasl_username", "")

    @property
    def client_address(self) -> str:
        return self._attrs.get("client_address", "")

    @property
    def client_name(self) -> str:
        return self._attrs.get("client_name", "")

    @property
    def helo_name(self) -> str:
        return self._attrs.get("helo_name", "")

    @property
    def size(self) -> int:
        """The ``SIZE=`` announced at MAIL FROM (0 if none); the real size at end of data."""
        return self._int("size")


class MalformedRequest(ValueError):
    """A complete request that breaks the protocol; the reason goes to the log."""


def encode_action(action: str) -> bytes:
    """The reply for ``action``. An action is one line to Postfix: CR, LF and NUL become
    spaces so a handler echoing client data can never inject a second reply."""
    if "\n" in action or "\r" in action or "\0" in action:
        action = action.replace("\r", " ").replace("\n", " ").replace("\0", " ")
    line = f"action={action}\n\n"
    try:
        return line.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return line.encode("utf-8", "replace")


def parse_request(block: bytes | bytearray, max_attributes: int) -> dict[str, str]:
    """Attributes of one request (``block`` without its final ``\\n\\n``). Bytes that are not
    UTF-8 survive as surrogate escapes, so values round-trip and never raise; a NUL, which no
    attribute may hold, makes the request malformed."""
    if block.count(b"\n") >= max_attributes:
        raise MalformedRequest(f"more than {max_attributes} attributes")
    if b"\0" in block:  # names and values never hold one (SMTPD_POLICY_README)
        raise MalformedRequest("NUL byte")
    lines = block.decode("utf-8", "surrogateescape").split("\n")
    try:
        # Every line splits in two or dict() refuses it: the whole request in one C-level pass.
        attrs = dict(line.split("=", 1) for line in lines)
    except ValueError:
        attrs = None
    if attrs is None or "" in attrs:
        raise _first_malformed_line(lines)
    request = attrs.get("request")
    if request != REQUEST_TYPE:
        raise MalformedRequest(f"request={(request or '')[:LOG_SNIPPET]!r}, not {REQUEST_TYPE}")
    return attrs


def _first_malformed_line(lines: list[str]) -> MalformedRequest:
    """Why a request's lines do not parse, naming the first line at fault (for the log)."""
    for line in lines:
        name, sep, _ = line.partition("=")
        if not sep or not name:
            what = "no '='" if not sep else "empty attribute name"
            return MalformedRequest(f"{what} in line {line[:LOG_SNIPPET]!r}")
    return MalformedRequest("unparsable request")
