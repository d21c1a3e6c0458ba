"""Typed, immutable configuration objects.

Every option of the YAML file has one field here with its default, so the rules never see a raw
dict and never guess a default of their own. Loading and validation live in `configfile`; this
module only says what a valid configuration looks like.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Literal, get_args

from mailgate.infra.socketspec import SocketSpec
from mailgate.rules.addresses import domain_spellings
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
ServerAuth = Literal["password", "xoauth2"]
OAuthProvider = Literal["google", "microsoft", "custom"]
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
SERVER_AUTHS = get_args(ServerAuth)
OAUTH_PROVIDERS = get_args(OAuthProvider)


@dataclass(frozen=True)
class OAuthSettings:
    """How a server's access tokens are obtained: the refresh-token grant at the provider's token
    endpoint (Odoo's "Log in with Google / Microsoft"). The URLs left empty come from the
    provider's table (`mailgate.oauth.providers`); `custom` names its token URL itself."""

    provider: OAuthProvider
    client_id: str
    refresh_token_file: Path
    client_secret_file: Path | None = None
    scope: str = ""
    tenant: str = "common"
    token_url: str | None = None
    device_code_url: str | None = None
    authorize_url: str | None = None


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
    auth: ServerAuth = "password"
    oauth: OAuthSettings | None = None
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
class AliasDomain:
    """One company's mail domain, Odoo 17+'s `mail.alias.domain`: its bounce and catchall
    addresses, and the default sender a foreign author is encapsulated into (docs/rules.md O1).
    The file's order is Odoo's `sequence` order: the first is the default domain."""

    name: str
    bounce_alias: str = "bounce"
    catchall_alias: str = "catchall"
    default_from: str | None = "notifications"

    @property
    def bounce_address(self) -> str:
        return f"{self.bounce_alias}@{self.name}"

    @property
    def catchall_address(self) -> str:
        return f"{self.catchall_alias}@{self.name}"

    @property
    def notification_address(self) -> str | None:
        """O1: `default_from` as is when it holds `@`, else joined to this domain."""
        default_from = (self.default_from or "").strip()
        if "@" in default_from:
            return default_from
        return f"{default_from}@{self.name}" if default_from else None


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
    metrics: SocketSpec | None = None      # HTTP /metrics and /healthz; None: off
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
    # Odoo's mail.alias.domain records in sequence order; `alias_domain` and its three companion
    # keys in the file are the shorthand for one entry
    alias_domains: tuple[AliasDomain, ...] = ()
    # the notification address when no alias domain is configured (a full address, else none)
    default_from: str | None = "notifications"
    default_from_filter: FromFilter = field(default_factory=FromFilter.empty)
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

    @property
    def alias_domain(self) -> str | None:
        """The default (first) alias domain's name: what a command checks when told no domain."""
        return self.alias_domains[0].name if self.alias_domains else None

    @cached_property
    def alias_domain_names(self) -> tuple[str, ...]:
        """Every alias domain's name, in order."""
        return tuple(d.name for d in self.alias_domains)

    @cached_property
    def alias_domain_set(self) -> frozenset[str]:
        """The alias domains, lower-cased, in both spellings of a non-ASCII name."""
        return frozenset(self._domains_by_name)

    @cached_property
    def _domains_by_name(self) -> dict[str, AliasDomain]:
        return {spelling: d for d in self.alias_domains for spelling in domain_spellings(d.name)}

    def domain_named(self, name: str | None) -> AliasDomain | None:
        """The alias domain of that name (any case), else None."""
        return self._domains_by_name.get((name or "").lower())

    @cached_property
    def _aliases_by_address(self) -> dict[str, Alias]:
        found: dict[str, Alias] = {}
        for alias in self.aliases:
            for spelling in domain_spellings(alias.domain):
                found.setdefault(f"{alias.name.lower()}@{spelling}", alias)
        return found

    def alias_at(self, address: str) -> Alias | None:
        """The alias of that full address (lower-cased; either spelling of its domain)."""
        return self._aliases_by_address.get(address)

    @cached_property
    def shared_alias_names(self) -> frozenset[str]:
        """Alias names that live on several domains (`sales@a`, `sales@b`): Postfix hands such an
        alias to Odoo by its full address, so that each reaches its own model."""
        counts = Counter(a.name for a in self.aliases)
        return frozenset(name for name, count in counts.items() if count > 1)

    @cached_property
    def bounce_aliases(self) -> tuple[str, ...]:
        """Every domain's bounce alias (the local part before `+TOKEN`), each once; `bounce`
        when no alias domain is configured."""
        return tuple(dict.fromkeys(d.bounce_alias for d in self.alias_domains)) or ("bounce",)

    @cached_property
    def accepted_domain_set(self) -> frozenset[str]:
        """The alias domains and the allowed alias domains: where the aliases live."""
        return self.alias_domain_set.union(*(domain_spellings(d) for d in self.allowed_alias_domains))
