"""`mailgate postfix-config`: the Postfix settings that wire a configuration in.

main.cf settings come as `key = value` lines for `postconf -e`; master.cf services as whole
service entries for `postconf -M` (or pasting). One `smtp` transport per upstream server carries
that server's TLS and SASL settings, so servers never share credentials or TLS policy. Inbound
mail for the alias domains is relayed to mailgate's delivery map, checked per recipient by the
policy service, and handed to Odoo by a pipe(8) service. The policy service is asked again at
the end of every message: the daily quota is taken at RCPT and kept only for messages that reach
it (docs/rules.md Q).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mailgate.config import DEFAULT_CONFIG_PATH, Config, Server
from mailgate.configfile import oauth as configfile_oauth
from mailgate.infra.socketspec import SocketSpec
from mailgate.rules.delivery import ODOO_TRANSPORT
from mailgate.rules.replies import POLICY_UNAVAILABLE

SUBMISSION_LISTENER = "ORIGINATING"
INBOUND_LISTENER = "INBOUND"
LOCAL_SUBMISSION = "127.0.0.1:10025"
DEFAULT_BIN = "/usr/local/bin/mailgate"
XOAUTH2_PLUGIN = configfile_oauth.XOAUTH2_PLUGIN
"""mailgate's Cyrus SASL client plugin for XOAUTH2 (sasl/xoauth2.c): it sends the SASL password,
the socketmap's current access token, as the bearer token. Debian's libsasl2-modules-kdexoauth2
offers the same mechanism name but fails under Postfix ("invalid parameter supplied"): it asks
for the password in a form Postfix does not hand it out in."""


@dataclass(frozen=True)
class Wiring:
    """Where the pipe finds mailgate and its configuration, and whom it runs as."""

    mailgate_bin: str = DEFAULT_BIN
    config_path: str = str(DEFAULT_CONFIG_PATH)
    pipe_user: str = "mailgate"


def postfix_map(spec: SocketSpec, mapname: str) -> str:
    """A socketmap table reference: `socketmap:unix:/run/mailgate/lookup.sock:transport`."""
    return f"socketmap:{spec.postfix_address()}:{mapname}"


_PLAIN_DOMAIN = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")


def outside_domains_table(domains: Iterable[str]) -> str | None:
    """An inline regexp table (Postfix 3.7) that answers `:` for every address the `delivery` map
    would answer NOTFOUND for, so that trivial-rewrite asks mailgate only about the alias domains:
    outbound mail then costs one lookup round trip less per recipient.

    `:` in transport(5) is "change nothing", the same as no entry; the lookup stops there instead
    of reaching the socketmap. What is left to the socketmap, as before: an address whose domain
    (after its last `@`, trailing spaces aside) is one of `domains` (`accepted_domain_set`: every
    spelling, lower-cased; the table ignores case as `normalize` does), and any address with a
    byte outside printable ASCII, whose case folding only Python gets right. None when a domain
    is not plain ASCII: the socketmap alone then decides, as before. `$$` is main.cf's `$`."""
    names = sorted(set(domains))
    if not names or not all(_PLAIN_DOMAIN.fullmatch(name) for name in names):
        return None
    alternatives = "|".join(name.replace(".", "\\.") for name in names)
    return f"regexp:{{{{!/@({alternatives}) *$$|[^ -~]/ :}}}}"


def delivery_maps(config: Config) -> str:
    """transport_maps: the alias domains' recipients through the `delivery` socketmap, every other
    recipient settled by Postfix without asking (`outside_domains_table`)."""
    socketmap = postfix_map(config.listen.lookup, "delivery")
    outside = outside_domains_table(config.accepted_domain_set)
    return socketmap if outside is None else f"{outside}, {socketmap}"


def milter_address(spec: SocketSpec) -> str:
    """Postfix's milter address syntax: `unix:/path` or `inet:host:port`."""
    return spec.postfix_address()


def main_settings(config: Config) -> list[tuple[str, str]]:
    """The main.cf settings, in the order an operator reads them."""
    milter = milter_address(config.listen.milter)
    settings = [
        ("smtpd_milters", milter),
        ("non_smtpd_milters", milter),
        ("milter_default_action", "tempfail"),
        ("milter_protocol", "6"),
        ("milter_macro_daemon_name", SUBMISSION_LISTENER),
        ("sender_dependent_default_transport_maps", postfix_map(config.listen.lookup, "transport")),
        ("smtp_tls_CApath", "/etc/ssl/certs"),
        ("smtp_tls_loglevel", "1"),
    ]
    domains = list(dict.fromkeys([*config.alias_domain_names, *config.allowed_alias_domains]))
    if domains:
        settings += [
            ("relay_domains", " ".join(domains)),
            ("transport_maps", delivery_maps(config)),
            ("smtpd_recipient_restrictions",
             f"check_policy_service {config.listen.policy.postfix_address()}"),
            # the end of each message, so that the daily quota is paid only for mail accepted
            ("smtpd_end_of_data_restrictions",
             f"check_policy_service {config.listen.policy.postfix_address()}"),
            ("smtpd_policy_service_default_action", str(POLICY_UNAVAILABLE)),
            (f"{ODOO_TRANSPORT}_destination_recipient_limit", "1"),
            ("internal_mail_filter_classes", "bounce"),
        ]
    return settings


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
        if server.auth == "xoauth2":
            options.append("smtp_sasl_mechanism_filter=xoauth2")
    else:
        options.append("smtp_sasl_auth_enable=no")
    options.append(f"syslog_name=postfix/{server.transport_name}")  # the log names the server (watch-log)
    return [f"{server.transport_name} unix - - n - - smtp", *(f"  -o {o}" for o in options)]


def submission_service(listen: str, daemon_name: str) -> list[str]:
    """A loopback listener for Odoo and local applications, marked for the outbound role."""
    return [f"{listen} inet n - n - - smtpd",
            f"  -o milter_macro_daemon_name={daemon_name}",
            f"  -o smtpd_policy_service_policy_context={daemon_name}",
            "  -o smtpd_client_restrictions=permit_mynetworks,reject",
            "  -o smtpd_relay_restrictions=permit_mynetworks,reject"]


def inbound_service() -> list[str]:
    """The public port-25 listener: the inbound role."""
    return ["smtp inet n - n - - smtpd", f"  -o milter_macro_daemon_name={INBOUND_LISTENER}",
            f"  -o smtpd_policy_service_policy_context={INBOUND_LISTENER}"]


def odoo_pipe_service(wiring: Wiring) -> list[str]:
    """pipe(8) into `mailgate deliver`: D adds Delivered-To (Odoo routes on it), R Return-Path."""
    return [f"{ODOO_TRANSPORT} unix - n n - 4 pipe",
            f"  flags=DRq user={wiring.pipe_user} argv={wiring.mailgate_bin} deliver "
            f"--config {wiring.config_path} --alias ${{nexthop}}"]


def master_services(config: Config, wiring: Wiring = Wiring()) -> list[list[str]]:
    services = [submission_service(LOCAL_SUBMISSION, SUBMISSION_LISTENER)]
    for offset, listener in enumerate(config.mass_mail.listeners, start=1):
        services.append(submission_service(f"127.0.0.1:{10025 + offset}", listener))
    services += [transport_service(config, server) for server in config.servers]
    if config.alias_domain_names:
        services += [inbound_service(), odoo_pipe_service(wiring)]
    return services


# What a master.cf fragment cannot do by itself, said where the operator pastes it.
MASTER_NOTES = [
    "# Every Postfix service that reaches mailgate's sockets (smtpd, cleanup, trivial-rewrite, smtp)",
    "# must run unchrooted, or the sockets under /run/mailgate are out of its sight and all mail",
    "# tempfails: Debian's master.cf chroots most services; `postconf -F '*/*/chroot = n'` undoes it.",
    "# The \"smtp inet\" entry below replaces the one master.cf already has.",
]


def xoauth2_notes(config: Config) -> list[str]:
    """What a server logging in with OAuth needs beyond Postfix's own packages."""
    names = [s.name for s in config.servers if s.auth == "xoauth2"]
    if not names:
        return []
    return [f"# {', '.join(names)}: XOAUTH2 needs mailgate's Cyrus SASL plugin ({XOAUTH2_PLUGIN}):",
            "#   apt-get install libsasl2-modules libsasl2-dev gcc && scripts/install-sasl-xoauth2",
            "#   and not Debian's libsasl2-modules-kdexoauth2 (same mechanism name; fails under Postfix)",
            "# (mailgate answers each sasl map with the account and its current access token)"]


def render(config: Config, part: str | None = None, wiring: Wiring = Wiring()) -> str:
    lines: list[str] = []
    if part in (None, "main"):
        lines.append("# main.cf (postconf -e 'key = value')")
        lines += [f"{key} = {value}" for key, value in main_settings(config)]
    if part in (None, "master"):
        if lines:
            lines.append("")
        lines.append("# master.cf")
        lines += MASTER_NOTES[: None if config.alias_domain_names else -1]
        lines += xoauth2_notes(config)
        for service in master_services(config, wiring):
            lines += service
    return "\n".join(lines) + "\n"
