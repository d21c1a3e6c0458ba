"""`mailgate postfix-config`: the Postfix settings that wire a configuration in.

main.cf settings come as `key = value` lines for `postconf -e`; master.cf services as whole
service entries for `postconf -M` (or pasting). One `smtp` transport per upstream server carries
that server's TLS and SASL settings, so servers never share credentials or TLS policy.
"""

from __future__ import annotations

from mailgate.config import Config, Server
from mailgate.sockets import parse_socket_spec

SUBMISSION_LISTENER = "ORIGINATING"
LOCAL_SUBMISSION = "127.0.0.1:10025"


def postfix_map(spec: str, mapname: str) -> str:
    """A socketmap table reference: `socketmap:unix:/run/mailgate/lookup.sock:transport`."""
    parsed = parse_socket_spec(spec)
    if parsed.family == "unix":
        return f"socketmap:unix:{parsed.path}:{mapname}"
    return f"socketmap:{parsed.family}:{parsed.host}:{parsed.port}:{mapname}"


def milter_address(spec: str) -> str:
    """Postfix's milter address syntax: `unix:/path` or `inet:host:port`."""
    parsed = parse_socket_spec(spec)
    if parsed.family == "unix":
        return f"unix:{parsed.path}"
    return f"{parsed.family}:{parsed.host}:{parsed.port}"


def main_settings(config: Config) -> list[tuple[str, str]]:
    """The main.cf settings, in the order an operator reads them."""
    milter = milter_address(config.listen.milter)
    return [
        ("smtpd_milters", milter),
        ("non_smtpd_milters", milter),
        ("milter_default_action", "tempfail"),
        ("milter_protocol", "6"),
        ("milter_macro_daemon_name", SUBMISSION_LISTENER),
        ("sender_dependent_default_transport_maps", postfix_map(config.listen.lookup, "transport")),
        ("smtp_tls_CApath", "/etc/ssl/certs"),
        ("smtp_tls_loglevel", "1"),
    ]


def transport_service(config: Config, server: Server) -> list[str]:
    """One master.cf `smtp` service for a server: its TLS mode and its own credentials."""
    options = []
    if server.security == "tls":
        options.append("smtp_tls_wrappermode=yes")
    if server.security == "none":
        options.append("smtp_tls_security_level=none")
    else:
        options.append(f"smtp_tls_security_level={'secure' if server.tls_verify else 'encrypt'}")
        if server.tls_verify:
            options.append("smtp_tls_secure_cert_match=nexthop")
        if server.tls_ca_file:
            options.append(f"smtp_tls_CAfile={server.tls_ca_file}")
    if server.username:
        options += [
            "smtp_sasl_auth_enable=yes",
            f"smtp_sasl_password_maps={postfix_map(config.listen.lookup, 'sasl-' + server.name)}",
            "smtp_sasl_security_options=noanonymous",
            "smtp_sasl_tls_security_options=noanonymous",
        ]
    else:
        options.append("smtp_sasl_auth_enable=no")
    return [f"{server.transport_name} unix - - n - - smtp", *(f"  -o {o}" for o in options)]


def submission_service(listen: str, daemon_name: str) -> list[str]:
    """A loopback listener for Odoo and local applications, marked for the outbound role."""
    return [f"{listen} inet n - n - - smtpd",
            f"  -o milter_macro_daemon_name={daemon_name}",
            "  -o smtpd_client_restrictions=permit_mynetworks,reject",
            "  -o smtpd_relay_restrictions=permit_mynetworks,reject"]


def master_services(config: Config) -> list[list[str]]:
    services = [submission_service(LOCAL_SUBMISSION, SUBMISSION_LISTENER)]
    for offset, listener in enumerate(config.mass_mail.listeners, start=1):
        services.append(submission_service(f"127.0.0.1:{10025 + offset}", listener))
    services += [transport_service(config, server) for server in config.servers]
    return services


def render(config: Config, part: str | None = None) -> str:
    lines: list[str] = []
    if part in (None, "main"):
        lines.append("# main.cf (postconf -e 'key = value')")
        lines += [f"{key} = {value}" for key, value in main_settings(config)]
    if part in (None, "master"):
        if lines:
            lines.append("")
        lines.append("# master.cf")
        for service in master_services(config):
            lines += service
    return "\n".join(lines) + "\n"
