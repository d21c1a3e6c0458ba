"""Typed, immutable configuration objects.

Every option of the YAML file has one field here with its default, so the rules never see a raw
dict and never guess a default of their own. Loading and validation live in `configfile`; this
module only says what a valid configuration looks like.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args

from mailgate.infra.socketspec import SocketSpec
from mailgate.rules.filters import FromFilter

DEFAULT_CONFIG_PATH = Path("/etc/mailgate/mailgate.yaml")

# Every choice a key offers, as a type (carried through the code) and its values (for the loader).
SecurityMode = Literal["none", "starttls", "tls"]
ServerSelection = Literal["odoo", "documented"]
LoopAction = Literal["reject", "defer", "hold"]
DirectWriteAction = Literal["pass", "reject"]
MalformedFromAction = Literal["rewrite", "reject"]
QuotaScope = Literal["gateway", "sender_domain", "sasl_user"]
MalformedAction = Literal["dunno", "defer"]
BounceForward = Literal["odoo", "discard"]
# Which bounces count toward the blacklist (docs/rules.md B3): the recipient's fault only, every
# permanent failure (mailgate before reasons), every bounce (Odoo).
BounceCount = Literal["recipient", "permanent", "all"]
QuotaAction = Literal["defer", "hold"]
SECURITY_MODES = get_args(SecurityMode)
SERVER_SELECTIONS = get_args(ServerSelection)
LOOP_ACTIONS = get_args(LoopAction)
DIRECT_WRITE_ACTIONS = get_args(DirectWriteAction)
MALFORMED_FROM_ACTIONS = get_args(MalformedFromAction)
QUOTA_SCOPES = get_args(QuotaScope)
MALFORMED_ACTIONS = get_args(MalformedAction)
BOUNCE_FORWARDS = get_args(BounceForward)
BOUNCE_COUNTS = get_args(BounceCount)
QUOTA_ACTIONS = get_args(QuotaAction)


@dataclass(frozen=True)
class Server:
    """One upstream relay, Odoo's `ir.mail_server`."""

    name: str
    host: str
    port: int = 587
    security: SecurityMode = "starttls"
    username: str | None = None
    password_file: Path | None = None
    from_filter: FromFilter = field(default_factory=FromFilter.empty)
    priority: int = 10
    active: bool = True
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    position: int = 0  # order in the file: breaks priority ties as Odoo's record order does

    @property
    def transport_name(self) -> str:
        """The master.cf service that delivers through this server."""
        return f"mg-{self.name}"

    @property
    def nexthop(self) -> str:
        """Brackets: a relay is reached at its own address, never through its MX records."""
        return f"[{self.host}]:{self.port}"

    @property
    def transport(self) -> str:
        return f"{self.transport_name}:{self.nexthop}"


@dataclass(frozen=True)
class Alias:
    """A business alias (`sales@`, `support@`): Odoo's `mail.alias`."""

    name: str
    target: str
    domain: str
    incoming_local: bool = False

    @property
    def address(self) -> str:
        return f"{self.name}@{self.domain}"


@dataclass(frozen=True)
class LoopSettings:
    minutes: int = 120
    threshold: int = 20
    action: LoopAction = "reject"
    allowed_senders: tuple[str, ...] = ()


@dataclass(frozen=True)
class BounceSettings:
    """The blacklist rule (docs/rules.md B3) and what becomes of a report once recorded."""

    blacklist_after: int = 5
    window_days: int = 91
    min_spread_days: int = 7
    count: BounceCount = "recipient"
    token_days: int = 30          # a report on an older token is recorded as stale, never counted
    forward: BounceForward = "odoo"         # odoo: hand the report to Odoo | discard: record only
    # The "it's our fault" alert (B6): sender-side bounces per server and recipient domain within
    # one window of `reputation_window_minutes`; None: no alert.
    reputation_threshold: int | None = 10
    reputation_window_minutes: int = 60


@dataclass(frozen=True)
class QuotaSettings:
    """Recipients per rolling 24 hours, per scope; mass mail has its own limit."""

    daily: int | None = 200
    mass_daily: int | None = 200
    scope: QuotaScope = "sender_domain"
    action: QuotaAction = "defer"         # defer: DEFER_IF_PERMIT 4.7.1 | hold: Postfix's hold queue


@dataclass(frozen=True)
class MassMailSettings:
    """The signs that make a message mass mail, and the server dedicated to it."""

    server: str | None = None
    listeners: tuple[str, ...] = ()
    sasl_users: tuple[str, ...] = ()
    headers: tuple[tuple[str, str | None], ...] = (("precedence", "bulk"),)


@dataclass(frozen=True)
class ListenSettings:
    milter: SocketSpec = SocketSpec("unix", path="/run/mailgate/milter.sock")
    lookup: SocketSpec = SocketSpec("unix", path="/run/mailgate/lookup.sock")
    policy: SocketSpec = SocketSpec("unix", path="/run/mailgate/policy.sock")
    socket_group: str | None = "postfix"


@dataclass(frozen=True)
class PolicySettings:
    """What the policy service answers a request it cannot read: let Postfix go on, or defer."""

    on_malformed: MalformedAction = "dunno"


@dataclass(frozen=True)
class OdooSettings:
    url: str = "http://127.0.0.1:8069"
    database: str = "odoo"
    user: str = "admin"
    password_file: Path | None = None


@dataclass(frozen=True)
class Config:
    alias_domain: str | None = None
    default_from: str | None = "notifications"
    default_from_filter: FromFilter = field(default_factory=FromFilter.empty)
    catchall_alias: str = "catchall"
    bounce_alias: str = "bounce"
    allowed_alias_domains: tuple[str, ...] = ()
    # `allowed_alias_domains: []` written out: Odoo's empty mail.catchall.domain.allowed, where an
    # incoming_local alias matches its name on any domain (left out, the list is the alias domains)
    incoming_local_anywhere: bool = False
    aliases: tuple[Alias, ...] = ()
    catchall_direct_write: DirectWriteAction = "pass"
    fallback_target: str | None = None
    loop: LoopSettings = field(default_factory=LoopSettings)
    bounces: BounceSettings = field(default_factory=BounceSettings)
    quota: QuotaSettings = field(default_factory=QuotaSettings)
    servers: tuple[Server, ...] = ()
    mass_mail: MassMailSettings = field(default_factory=MassMailSettings)
    inbound_listeners: tuple[str, ...] = ("INBOUND",)
    listen: ListenSettings = field(default_factory=ListenSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    odoo: OdooSettings = field(default_factory=OdooSettings)
    server_selection: ServerSelection = "odoo"
    # docs/rules.md O5: a From that cannot be read as mailboxes, or several From headers, holding an
    # address the server may not send for: replaced by the notification address, or refused (554 5.6.0)
    malformed_from: MalformedFromAction = "rewrite"
    dry_run: bool = False
    database: str = "/var/lib/mailgate/mailgate.sqlite3"
    database_password_file: Path | None = None
    secret_file: Path = Path("/etc/mailgate/secret")
    source: Path | None = None

    def __getstate__(self) -> dict[str, object]:
        """Only the fields travel (to the milter process): the derived views are rebuilt there,
        and another thread may be adding one to this object while it is pickled."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # The derived views below are computed once per configuration (the lookup service asks for
    # them on every request); a reload builds a new Config, so they never go stale.
    @cached_property
    def active_servers(self) -> tuple[Server, ...]:
        """Candidates in Odoo's order: ascending priority, ties in file order."""
        return tuple(sorted((s for s in self.servers if s.active),
                            key=lambda s: (s.priority, s.position)))

    def server_named(self, name: str | None) -> Server | None:
        for server in self.servers:
            if server.name == name:
                return server
        return None

    @cached_property
    def mass_server(self) -> Server | None:
        """The dedicated mass-mail server, when one is configured and active."""
        server = self.server_named(self.mass_mail.server)
        return server if server is not None and server.active else None

    @cached_property
    def alias_domains(self) -> tuple[str, ...]:
        """Every domain that holds our aliases: the alias domain first, then the aliases' own."""
        domains: list[str] = []
        for domain in [self.alias_domain, *(a.domain for a in self.aliases)]:
            if domain and domain not in domains:
                domains.append(domain)
        return tuple(domains)

    @cached_property
    def alias_domain_set(self) -> frozenset[str]:
        """The alias domains, lower-cased, for membership tests."""
        return frozenset(d.lower() for d in self.alias_domains)

    @cached_property
    def accepted_domain_set(self) -> frozenset[str]:
        """The alias domains and the allowed alias domains: where the aliases live."""
        return self.alias_domain_set | frozenset(d.lower() for d in self.allowed_alias_domains)
