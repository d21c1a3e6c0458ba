"""Odoo's Gmail and Outlook servers (`smtp_authentication` `gmail` / `outlook`, modules google_gmail
and microsoft_outlook) as `auth: xoauth2` servers: the refresh token Odoo keeps on the server and
the OAuth client of the system parameters, each into its own 0600 file.

Without a client id and secret in the system parameters, Odoo got its tokens through Odoo's own
OAuth application and its IAP proxy: the refresh token belongs to Odoo's application and only
Odoo's proxy can refresh it. Nothing usable can be imported then; the server is written inactive
with what the administrator must set up instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mailgate.commands.importodoo.model import Odoo
from mailgate.commands.importodoo.yamlout import Out, scalar

# Odoo's method -> (provider, refresh token column, client id parameter, client secret parameter)
OAUTH_METHODS = {
    "gmail": ("google", "google_gmail_refresh_token", "google_gmail_client_id", "google_gmail_client_secret"),
    "outlook": ("microsoft", "microsoft_outlook_refresh_token", "microsoft_outlook_client_id",
                "microsoft_outlook_client_secret"),
}
OAUTH_COLUMNS = tuple(method[1] for method in OAUTH_METHODS.values())
OAUTH_PARAMS = (*(p for method in OAUTH_METHODS.values() for p in method[2:]), "microsoft.outlook.endpoint")
_TENANT = re.compile(r"^https://login\.microsoftonline\.com/([^/]+)/oauth2/v2\.0/?$")

OWN_CLIENT = {
    "google": "create an OAuth client in the Google Cloud console (APIs & Services > Credentials > "
              "OAuth client ID, type Desktop app; the Gmail API enabled, scope https://mail.google.com/)",
    "microsoft": "register an application in Microsoft Entra ID (App registrations; Authentication: allow "
                 "public client flows; API permissions: delegated SMTP.Send and offline_access; a client "
                 "secret under Certificates & secrets; SMTP AUTH enabled for the mailbox)",
}


def render_oauth(server: dict[str, Any], slug: str, odoo: Odoo, out: Out, secrets_dir: Path, ind: str) -> bool:
    """Write the server's login lines; True when the server can be used as imported."""
    method = server["smtp_authentication"]
    provider, column, id_param, secret_param = OAUTH_METHODS[method]
    user = (server["smtp_user"] or "").strip()
    refresh = (server.get(column) or "").strip()
    client_id, client_secret = odoo.params.get(id_param, ""), odoo.params.get(secret_param, "")
    if not (client_id and client_secret):
        out.warn(f"server {slug}: Odoo logs in to it with {method!r} through Odoo's own OAuth application and "
                 f"its IAP proxy ({id_param} / {secret_param} are not set), so its refresh token can only be "
                 "refreshed by Odoo's proxy, not by mailgate. It is made inactive. To use it: "
                 f"{OWN_CLIENT[provider]}; then add to this server auth: xoauth2 and an oauth block "
                 f"(provider: {provider}, client_id, client_secret_file, refresh_token_file), run "
                 f"`mailgate oauth login {slug}` for a refresh token, and set active: true", ind)
        out.deactivated.add(slug)
        return False
    if not (user and refresh):
        missing = "smtp_user" if not user else column
        out.warn(f"server {slug}: Odoo has no {missing} for this {method!r} server (never connected?): it is made "
                 f"inactive; set username, add auth: xoauth2 and the oauth block, and run "
                 f"`mailgate oauth login {slug}`", ind)
        out.deactivated.add(slug)
        return False
    refresh_path, secret_path = secrets_dir / f"{slug}-refresh-token", secrets_dir / f"{slug}-client-secret"
    out.secrets[refresh_path], out.secrets[secret_path] = refresh, client_secret
    out.add(f"{ind}username: {scalar(user)}  # [smtp_user]")
    out.add(f"{ind}auth: xoauth2  # [smtp_authentication {method}]")
    out.add(f"{ind}oauth:")
    out.add(f"{ind}  provider: {provider}")
    tenant = _tenant(odoo.params.get("microsoft.outlook.endpoint", "")) if provider == "microsoft" else None
    if tenant:
        out.add(f"{ind}  tenant: {scalar(tenant)}  # [microsoft.outlook.endpoint]")
    out.add(f"{ind}  client_id: {scalar(client_id)}  # [{id_param}]")
    out.add(f"{ind}  client_secret_file: {scalar(str(secret_path))}  # [{secret_param}], 0600")
    out.add(f"{ind}  refresh_token_file: {scalar(str(refresh_path))}  # [{column}], 0600")
    return True


def _tenant(endpoint: str) -> str | None:
    found = _TENANT.match(endpoint.strip())
    return found.group(1) if found and found.group(1) != "common" else None
