"""The OAuth providers as data: where to get tokens, which scope SMTP needs, how to log in.

A server's `oauth:` block names a provider; every URL it leaves out comes from here. Google's
device flow does not grant the mail scope, so its first login goes through a loopback redirect;
Microsoft's device flow does, and needs no browser on the gateway.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.config import OAuthSettings


@dataclass(frozen=True)
class Provider:
    token_url: str
    scope: str
    authorize_url: str | None = None
    device_code_url: str | None = None


_MICROSOFT = "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/"

PROVIDERS = {
    "google": Provider(
        token_url="https://oauth2.googleapis.com/token",
        scope="https://mail.google.com/",
        authorize_url="https://accounts.google.com/o/oauth2/v2/auth",
    ),
    "microsoft": Provider(
        token_url=_MICROSOFT + "token",
        scope="https://outlook.office.com/SMTP.Send offline_access",
        authorize_url=_MICROSOFT + "authorize",
        device_code_url=_MICROSOFT + "devicecode",
    ),
}
DEFAULT_SCOPES = {name: provider.scope for name, provider in PROVIDERS.items()}


def endpoints(settings: OAuthSettings) -> Provider:
    """The URLs and scope one server uses: its own where it gives them, else its provider's
    (the Microsoft tenant filled in)."""
    base = PROVIDERS.get(settings.provider)

    def pick(own: str | None, default: str | None) -> str | None:
        if own:
            return own
        return default.format(tenant=settings.tenant) if default else None

    token_url = pick(settings.token_url, base.token_url if base else None)
    if token_url is None:
        raise ValueError(f"provider {settings.provider} needs a token_url")
    return Provider(
        token_url=token_url,
        scope=settings.scope or (base.scope if base else ""),
        authorize_url=pick(settings.authorize_url, base.authorize_url if base else None),
        device_code_url=pick(settings.device_code_url, base.device_code_url if base else None),
    )
