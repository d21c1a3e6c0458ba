"""What each key accepts: converters from the plain YAML value to the typed value, and the key tables.

A converter raises Invalid with what was expected, so the reader can report it on the value's
line. The tables map every known key of each part of the file to its converter; a key missing
from a table is unknown (and gets a did-you-mean).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mailgate.config import (
    BOUNCE_COUNTS,
    BOUNCE_FORWARDS,
    DIRECT_WRITE_ACTIONS,
    LOOP_ACTIONS,
    MALFORMED_ACTIONS,
    MALFORMED_FROM_ACTIONS,
    OAUTH_PROVIDERS,
    QUOTA_ACTIONS,
    QUOTA_SCOPES,
    SECURITY_MODES,
    SERVER_AUTHS,
    SERVER_SELECTIONS,
)
from mailgate.infra.socketspec import SocketSpec, parse_socket_spec
from mailgate.rules.addresses import is_valid_address, is_valid_domain
from mailgate.rules.filters import FromFilter

_LOCAL_PART = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$", re.I)


class Invalid(Exception):
    """A value is of the wrong shape; the message says what was expected."""


class Doubtful(Exception):
    """A value mailgate can use although it looks wrong: kept, with a warning on its line."""

    def __init__(self, value: Any, message: str) -> None:
        super().__init__(message)
        self.value = value


def _wrong_only_for_underscores(domain: str) -> bool:
    """Odoo stores and matches names such as `my_company.com` as written (its from_filter and alias
    domain are plain text); only DNS refuses the underscore."""
    return "_" in domain and is_valid_domain(domain.replace("_", "u"))


def _not_dns(name: str) -> str:
    return f"{name!r} is not a DNS name (it holds '_'): kept, as Odoo matches it as written"


def describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"'{str(value).lower()}'"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value) if isinstance(value, str) else f"'{value}'"


# Converters: python value -> typed value, raising Invalid with what was expected.

def _str(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Invalid(f"expected text, got {describe(value)}")
    return str(value).strip()


def _opt_str(value: Any) -> str | None:
    return None if value is None else (_str(value) or None)


def _int(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected a whole number, got {describe(value)}")
        if not low <= value <= high:
            raise Invalid(f"expected a number from {low} to {high}, got {value}")
        return value
    return convert


def _opt_int(low: int, high: int) -> Callable[[Any], int | None]:
    inner = _int(low, high)
    return lambda value: None if value is None else inner(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {describe(value)}")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _str(value).lower()
        if text not in options:
            raise Invalid(f"expected one of {', '.join(options)}, got {describe(value)}")
        return text
    return convert


def _str_list(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    if not isinstance(value, list):
        raise Invalid(f"expected a list, got {describe(value)}")
    return tuple(_str(v) for v in value)


def domain_name(value: Any) -> str:
    """A domain name, lower-cased."""
    text = _str(value).lower()
    if not is_valid_domain(text):
        if _wrong_only_for_underscores(text):
            raise Doubtful(text, _not_dns(text))
        raise Invalid(f"expected a domain name like mycompany.com, got {describe(value)}")
    return text


def _opt_domain(value: Any) -> str | None:
    return None if value in (None, "") else domain_name(value)


def _domains(value: Any) -> tuple[str, ...]:
    domains, doubts = [], []
    for item in _str_list(value):
        try:
            domains.append(domain_name(item))
        except Doubtful as doubt:
            domains.append(doubt.value)
            doubts.append(str(doubt))
    if doubts:
        raise Doubtful(tuple(domains), "; ".join(doubts))
    return tuple(domains)


def _address(value: Any) -> str:
    text = _str(value)
    if not is_valid_address(text):
        raise Invalid(f"expected an email address like name@example.com, got {describe(value)}")
    return text


def _addresses(value: Any) -> tuple[str, ...]:
    return tuple(_address(v) for v in _str_list(value))


def _default_from(value: Any) -> str | None:
    text = _opt_str(value)
    if text is None:
        return None
    if "@" in text:
        return _address(text)
    if not _LOCAL_PART.match(text):
        raise Invalid(f"expected a local part (notifications) or an address, got {describe(value)}")
    return text


def _from_filter(value: Any) -> FromFilter:
    if value is None:
        return FromFilter.empty()
    parts = list(_str_list(value)) if isinstance(value, list) else [p.strip() for p in _str(value).split(",")]
    doubts = []
    for part in (p for p in parts if p):
        local, at, domain = part.rpartition("@")
        if at and not is_valid_address(part):
            if not (_wrong_only_for_underscores(domain) and is_valid_address(f"{local}@{domain.replace('_', 'u')}")):
                raise Invalid(f"'{part}' is not an email address")
            doubts.append(_not_dns(part))
        if not at and not is_valid_domain(part):
            if not _wrong_only_for_underscores(part):
                raise Invalid(f"'{part}' is not a domain (expected a domain, an address or a comma list)")
            doubts.append(_not_dns(part))
    parsed = FromFilter.parse(",".join(parts))
    if doubts:
        raise Doubtful(parsed, "; ".join(doubts))
    return parsed


def _path(value: Any) -> Path:
    return Path(_str(value))


def _opt_path(value: Any) -> Path | None:
    return None if value in (None, "") else _path(value)


def _opt_url(value: Any) -> str | None:
    text = _opt_str(value)
    if text is not None and not text.startswith(("https://", "http://")):
        raise Invalid(f"expected an https:// URL, got {describe(value)}")
    return text


def _database(value: Any) -> str:
    text = _str(value)
    if "://" in text and not text.startswith(("postgresql://", "postgres://")):
        raise Invalid("expected the path of a SQLite file or a postgresql:// URL")
    return text


def _socket_spec(value: Any) -> SocketSpec:
    text = _str(value)
    try:
        return parse_socket_spec(text)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def _opt_http_spec(value: Any) -> SocketSpec | None:
    """The metrics listener: HTTP, so `inet:`/`inet6:` only; null (the default) leaves it off."""
    if value in (None, ""):
        return None
    spec = _socket_spec(value)
    if spec.family == "unix":
        raise Invalid("expected inet:PORT@HOST or inet6:PORT@HOST (Prometheus scrapes over TCP)")
    return spec


def _header_signs(value: Any) -> tuple[tuple[str, str | None], ...]:
    """`[Precedence: bulk, List-Unsubscribe]`: a header with a value, or a header's presence."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise Invalid(f"expected a list of 'Header: value' or 'Header', got {describe(value)}")
    signs: list[tuple[str, str | None]] = []
    for item in value:
        if isinstance(item, dict) and len(item) == 1:
            (name, wanted), = item.items()
            signs.append((_str(name).lower(), None if wanted is None else _str(wanted).lower()))
        elif isinstance(item, str):
            name, colon, wanted = item.partition(":")
            signs.append((name.strip().lower(), wanted.strip().lower() if colon else None))
        else:
            raise Invalid(f"expected 'Header: value' or 'Header', got {describe(item)}")
    return tuple(signs)


def local_part(value: Any) -> str:
    text = _str(value)
    if not _LOCAL_PART.match(text):
        raise Invalid(f"expected the local part of an address (no @), got {describe(value)}")
    return text.lower()


# Key tables: every key each part of the file accepts, and the converter of its value.

TOP = {
    "alias_domains": lambda v: v, "alias_domain": _opt_domain, "default_from": _default_from,
    "default_from_filter": _from_filter,
    "catchall_alias": lambda v: local_part(v), "bounce_alias": lambda v: local_part(v),
    "allowed_alias_domains": _domains, "aliases": lambda v: v, "catchall_direct_write": _choice(DIRECT_WRITE_ACTIONS),
    "fallback_target": _opt_str, "loop": lambda v: v, "bounces": lambda v: v, "quota": lambda v: v,
    "servers": lambda v: v, "mass_mail": lambda v: v, "inbound_listeners": _str_list, "listen": lambda v: v,
    "policy": lambda v: v,
    "odoo": lambda v: v, "server_selection": _choice(SERVER_SELECTIONS), "dry_run": _bool,
    "malformed_from": _choice(MALFORMED_FROM_ACTIONS),
    "database": _database, "database_password_file": _opt_path, "secret_file": _path,
}
SECTIONS = ("alias_domains", "aliases", "loop", "bounces", "quota", "servers", "mass_mail", "listen", "policy", "odoo")

SERVER = {
    "name": _str, "host": _str, "port": _int(1, 65535), "security": _choice(SECURITY_MODES),
    "username": _opt_str, "password_file": _opt_path, "from_filter": _from_filter,
    "priority": _int(-1_000_000, 1_000_000), "active": _bool, "tls_verify": _bool, "tls_ca_file": _opt_path,
    "auth": _choice(SERVER_AUTHS), "oauth": lambda v: v,
}
OAUTH = {
    "provider": _choice(OAUTH_PROVIDERS), "client_id": _str, "client_secret_file": _opt_path,
    "refresh_token_file": _path, "scope": _opt_str, "tenant": _str, "token_url": _opt_url,
    "device_code_url": _opt_url, "authorize_url": _opt_url,
}
LOOP = {"minutes": _int(1, 525_600), "threshold": _int(1, 1_000_000), "action": _choice(LOOP_ACTIONS),
         "allowed_senders": _addresses}
BOUNCES = {"blacklist_after": _int(1, 1000), "window_days": _int(1, 3650), "min_spread_days": _int(0, 3650),
            "count": _choice(BOUNCE_COUNTS), "count_soft": _bool, "token_days": _int(1, 3650),
            "forward": _choice(BOUNCE_FORWARDS), "reputation_threshold": _opt_int(1, 1_000_000),
            "reputation_window_minutes": _int(1, 10_080)}
QUOTA = {"daily": _opt_int(1, 100_000_000), "mass_daily": _opt_int(1, 100_000_000), "scope": _choice(QUOTA_SCOPES),
          "action": _choice(QUOTA_ACTIONS)}
MASS = {"server": _opt_str, "listeners": _str_list, "sasl_users": _str_list, "headers": _header_signs}
LISTEN = {"milter": _socket_spec, "lookup": _socket_spec, "policy": _socket_spec, "metrics": _opt_http_spec,
          "socket_group": _opt_str}
POLICY = {"on_malformed": _choice(MALFORMED_ACTIONS)}
ODOO = {"url": _str, "database": _str, "user": _str, "password_file": _opt_path}
ALIAS_DOMAIN = {"name": domain_name, "bounce_alias": local_part, "catchall_alias": local_part,
                "default_from": _default_from}
ALIAS = {"target": _str, "domain": domain_name, "incoming_local": _bool}
