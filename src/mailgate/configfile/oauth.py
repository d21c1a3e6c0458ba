"""A server's `auth: xoauth2` and its `oauth:` block: read, checked against the server's other
keys, and its secret files checked as `serve` reads them.

Odoo forces a Gmail or Outlook server's from_filter to the account's address (the provider
refuses any other sender), so a server that logs in with OAuth and gives no from_filter gets the
address it logs in with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mailgate.config import OAuthSettings
from mailgate.configfile.reader import Reader, build, node_of
from mailgate.configfile.values import OAUTH
from mailgate.infra.secretfile import UnusableFile, read_password_file
from mailgate.oauth.providers import DEFAULT_SCOPES
from mailgate.rules.filters import FromFilter


def read_oauth(reader: Reader, values: dict[str, Any], key: str) -> dict[str, Any]:
    """The keyword arguments the server's `auth`, `oauth` and `from_filter` make (none for a
    password server), every problem recorded."""
    auth = values.get("auth", "password")
    block = node_of(values, "oauth")
    if auth != "xoauth2":
        if block is not None:
            reader.problem(block, f"{key}.oauth", "given, but the server logs in with a password: "
                           "add auth: xoauth2, or remove the oauth block")
        return {}
    given = reader.section(block, f"{key}.oauth", OAUTH)
    where = block or node_of(values, "auth")
    missing = [k for k in ("provider", "client_id", "refresh_token_file") if k not in given]
    if given.get("provider") == "custom" and not given.get("token_url"):
        missing.append("token_url")
    for name in missing:
        reader.problem(where, f"{key}.oauth.{name}", "missing (an oauth block needs provider, client_id, "
                       "refresh_token_file, and token_url for a custom provider)")
    if not values.get("username"):
        reader.problem(node_of(values, "auth"), f"{key}.username",
                       "missing: XOAUTH2 logs in as the account's address (the mailbox the token was issued for)")
    if values.get("password_file"):
        reader.problem(node_of(values, "password_file"), f"{key}.password_file",
                       "auth: xoauth2 logs in with a token, not a password: remove password_file")
    if values.get("security") == "none":
        reader.problem(node_of(values, "security"), f"{key}.security",
                       "an OAuth token must never travel unencrypted: use starttls or tls")
    if missing:
        return {"auth": "xoauth2"}
    given.setdefault("scope", DEFAULT_SCOPES.get(given["provider"], ""))
    settings = build(OAuthSettings, {k: v for k, v in given.items() if v is not None})
    extra: dict[str, Any] = {"auth": "xoauth2", "oauth": settings}
    if "from_filter" not in values and values.get("username"):
        extra["from_filter"] = FromFilter.parse(values["username"])
    return extra


SASL_PLUGINS = Path("/usr/lib")
XOAUTH2_PLUGIN = "libmailgatexoauth2.so"
CONFLICTING_PLUGIN = "libkdexoauth2.so"


def check_oauth_files(reader: Reader, settings: OAuthSettings, values: dict[str, Any], key: str) -> None:
    """The client secret and the refresh token are read as password files are; the refresh
    token's folder must be writable, or a token the provider rotates cannot be kept. Postfix
    needs mailgate's Cyrus plugin, and not Debian's plugin of the same mechanism name."""
    block = node_of(values, "oauth")
    if not list(SASL_PLUGINS.glob(f"*/sasl2/{XOAUTH2_PLUGIN}")):
        reader.problem(node_of(values, "auth"), f"{key}.auth", f"Cyrus SASL has no {XOAUTH2_PLUGIN} here: "
                       "Postfix cannot log in with XOAUTH2 (run scripts/install-sasl-xoauth2)", "warning")
    if list(SASL_PLUGINS.glob(f"*/sasl2/{CONFLICTING_PLUGIN}")):
        reader.problem(node_of(values, "auth"), f"{key}.auth", "libsasl2-modules-kdexoauth2 is installed: its "
                       "XOAUTH2 fails under Postfix and Cyrus may pick it (apt-get remove it)", "warning")
    files = (("client_secret_file", settings.client_secret_file), ("refresh_token_file", settings.refresh_token_file))
    for name, path in files:
        if path is None:
            continue
        try:
            read_password_file(Path(path))
        except UnusableFile as exc:
            reader.problem(block, f"{key}.oauth.{name}", str(exc))
    folder = Path(settings.refresh_token_file).parent
    if folder.is_dir() and not os.access(folder, os.W_OK | os.X_OK):
        reader.problem(block, f"{key}.oauth.refresh_token_file",
                       f"{folder} is not writable by this user: a refresh token the provider rotates "
                       "cannot be saved", "warning")
