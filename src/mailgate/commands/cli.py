"""The `mailgate` command line: serving, checking, explaining.

Every subcommand takes `--config FILE` (before or after its name); then `MAILGATE_CONFIG`, then
/etc/mailgate/mailgate.yaml. JSON goes to stdout as one object; diagnostics go to stderr.
Configuration errors are printed as `file:line: key: message`, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mailgate.config import DEFAULT_CONFIG_PATH, Config
from mailgate.configfile import ConfigError, LoadedConfig, load_config
from mailgate.infra.logfmt import setup_logging
from mailgate.rules.replies import EXIT

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CONFIG = EXIT["ok"], EXIT["failure"], EXIT["usage"], EXIT["config"]


def config_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "config", None) or os.environ.get("MAILGATE_CONFIG") or DEFAULT_CONFIG_PATH)


def _load(args: argparse.Namespace, *, check_files: bool = True, check_startup: bool = False) -> LoadedConfig:
    loaded = load_config(config_path(args), check_files=check_files, check_startup=check_startup)
    for warning in loaded.warnings:
        print(warning, file=sys.stderr)
    return loaded


def cmd_check_config(args: argparse.Namespace) -> int:
    """OK only for a file `serve` starts with: the same loader and the same start-up checks."""
    loaded = _load(args, check_startup=True)
    config = loaded.config
    print(f"{config_path(args)}: OK ({len(config.servers)} server(s), {len(config.aliases)} alias(es))",
          file=sys.stderr)
    for line in alias_domain_lines(config):
        print(line, file=sys.stderr)
    return EXIT_OK


def alias_domain_lines(config: Config) -> list[str]:
    """One line per alias domain: its bounce, catchall and default sender, and its aliases."""
    lines = []
    for domain in config.alias_domains:
        names = [a.name + (" (incoming_local)" if a.incoming_local else "") for a in config.aliases
                 if a.domain == domain.name]
        lines.append(f"  alias domain {domain.name}: bounce {domain.bounce_address}, catchall "
                     f"{domain.catchall_address}, default sender {domain.notification_address or '(none)'}; "
                     f"aliases: {', '.join(names) or 'none'}")
    return lines


def cmd_serve(args: argparse.Namespace) -> int:
    from mailgate.commands.serve import serve
    from mailgate.infra.runtime import Runtime
    from mailgate.store.interface import StoreUnavailable
    config = _load(args, check_startup=True).config
    setup_logging()
    try:  # a file it cannot use after all (changed since the load) is a ConfigError: exit 78
        runtime = Runtime.from_config(config)
    except StoreUnavailable as exc:  # systemd restarts us; the log says why
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return serve(runtime, config_path(args))


def cmd_postfix_config(args: argparse.Namespace) -> int:
    import shutil

    from mailgate.commands.postfixconf import DEFAULT_BIN, Wiring, render
    wiring = Wiring(mailgate_bin=args.mailgate_bin or shutil.which("mailgate") or DEFAULT_BIN,
                    config_path=str(config_path(args).resolve()), pipe_user=args.pipe_user)
    sys.stdout.write(render(_load(args, check_files=False).config, args.part, wiring))
    return EXIT_OK


def cmd_explain_outbound(args: argparse.Namespace) -> int:
    from mailgate.rules.outbound import DOMAIN_TEXT, OutboundRequest, decide_outbound
    config: Config = _load(args, check_files=False).config
    decision = decide_outbound(config, OutboundRequest(args.header_from, args.sender, args.mass))
    result = {
        "server": decision.server_name,
        "header_from": decision.header_from,
        "envelope_from": decision.envelope_from,
        "alias_domain": decision.alias_domain.name if decision.alias_domain else None,
        "domain_reason": decision.domain_reason,
        "reasons": list(decision.reasons),
    }
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"server:        {result['server'] or '(Postfix default route)'}")
        print(f"header From:   {result['header_from']}{'  (rewritten)' if decision.rewritten else ''}")
        if decision.reply:
            print(f"refused:       {decision.reply}")
        print(f"envelope from: {result['envelope_from']}")
        if decision.alias_domain:
            print(f"alias domain:  {decision.alias_domain.name} ({DOMAIN_TEXT[decision.domain_reason]})")
        for reason in decision.reasons:
            print(f"  - {reason}")
        if decision.warning:
            print(f"warning: {decision.warning}", file=sys.stderr)
    return EXIT_OK


def cmd_explain_inbound(args: argparse.Namespace) -> int:
    """Odoo's route for one message file, against the live store when it exists (read only)."""
    import email
    from email import policy as email_policy

    from mailgate.infra.runtime import read_only_facts
    from mailgate.rules.inbound import decide_inbound
    from mailgate.rules.message import InboundMessage
    config: Config = _load(args, check_files=False).config
    try:
        raw = Path(args.message).read_bytes() if args.message != "-" else sys.stdin.buffer.read()
    except OSError as exc:
        print(f"mailgate: cannot read {args.message}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    parsed = email.message_from_bytes(raw, policy=email_policy.compat32)
    message = InboundMessage(tuple((k, str(v)) for k, v in parsed.items()), tuple(args.rcpt or ()))
    facts = read_only_facts(config)
    decision = decide_inbound(config, message, **facts)
    smtp_reply = str(decision.reply) if decision.reply else None
    result = {"routes": decision.labels, "action": decision.action, "smtp_reply": smtp_reply,
              "reasons": list(decision.reasons)}
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(f"routes:     {', '.join(decision.labels) or '(none)'}")
        print(f"action:     {decision.action}{'  ' + smtp_reply if smtp_reply else ''}")
        for reason in decision.reasons:
            print(f"  - {reason}")
    return EXIT_OK


def cmd_deliver(args: argparse.Namespace) -> int:
    """pipe(8) entry point: every failure of ours must defer (75), never bounce the message."""
    from mailgate.odoo.deliver import EX_TEMPFAIL, main_deliver
    try:
        config = load_config(config_path(args), check_files=False).config
    except ConfigError as exc:
        print(f"mailgate deliver: configuration error, message kept: {exc.problems[0]}", file=sys.stderr)
        return EX_TEMPFAIL
    return main_deliver(config, args.alias, sys.stdin.buffer, sys.stderr)


def _store(args: argparse.Namespace, config: Config | None = None):
    from mailgate.store import open_store
    config = config or _load(args, check_files=False).config
    return open_store(config.database, config.database_password_file)


def cmd_bounce_parse(args: argparse.Namespace) -> int:
    from mailgate.bounceparse import find_token, parse_bounce, report_json
    try:
        raw = sys.stdin.buffer.read() if args.file in (None, "-") else Path(args.file).read_bytes()
    except OSError as exc:
        print(f"mailgate: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    aliases: tuple[str, ...] = ("bounce",)
    if getattr(args, "config", None) or os.environ.get("MAILGATE_CONFIG") or DEFAULT_CONFIG_PATH.exists():
        aliases = _load(args, check_files=False).config.bounce_aliases
    found = [(alias, token) for alias in aliases if (token := find_token(raw, alias))]
    alias, token = found[0] if found else (aliases[0], None)
    print(json.dumps(report_json(parse_bounce(raw, bounce_alias=alias), token), ensure_ascii=False))
    return EXIT_OK


def cmd_bounces(args: argparse.Namespace) -> int:
    import time

    from mailgate.commands import views
    config = _load(args, check_files=False).config
    store = _store(args, config)
    since_text = views.default_since(args.since, args.all, config.bounces.window_days) if args.view == "stats" \
        else args.since
    try:
        since = views.parse_since(since_text, time.time())
    except ValueError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.view == "stats":
        return views.bounces_stats(store, since, args.json)
    return views.bounces_list(store, since, args.address, args.json)


def cmd_blacklist(args: argparse.Namespace) -> int:
    from mailgate.commands import views
    store = _store(args)
    if args.action == "list":
        return views.blacklist_list(store, args.json)
    if not args.address:
        print(f"mailgate: blacklist {args.action} needs an address", file=sys.stderr)
        return EXIT_USAGE
    if args.action == "why":
        return views.blacklist_why(store, args.address, args.json)
    return views.blacklist_change(store, args.action, args.address, args.reason, args.json)


def cmd_test_server(args: argparse.Namespace) -> int:
    from mailgate.commands import testserver
    config = _load(args, check_files=False).config
    if config.server_named(args.name) is None:
        names = ", ".join(s.name for s in config.servers) or "none"
        print(f"mailgate: no server named {args.name!r} (servers: {names})", file=sys.stderr)
        return EXIT_USAGE
    result = testserver.test_server(config, args.name, send_to=args.send_to, timeout=args.timeout)
    print(json.dumps(testserver.result_json(result)) if args.json else testserver.render(result))
    return EXIT_OK if result.ok else EXIT_FAILURE


def cmd_oauth_login(args: argparse.Namespace) -> int:
    """The first refresh token of an `auth: xoauth2` server (its file need not exist yet)."""
    from mailgate.infra.secretfile import UnusableFile
    from mailgate.oauth.login import LoginFailed, login
    config = _load(args, check_files=False).config
    server = config.server_named(args.name)
    if server is None or server.oauth is None:
        names = ", ".join(s.name for s in config.servers if s.oauth is not None) or "none"
        print(f"mailgate: no auth: xoauth2 server named {args.name!r} (such servers: {names})", file=sys.stderr)
        return EXIT_USAGE
    try:
        path = login(server, lambda text: print(text, file=sys.stderr, flush=True), flow=args.flow,
                     port=args.port, wait=args.wait)
    except (LoginFailed, UnusableFile, OSError) as exc:
        print(f"mailgate oauth login: {server.name}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"mailgate oauth login: {server.name}: refresh token stored in {path} (0600); a running serve "
          "uses it at its next refresh", file=sys.stderr)
    return EXIT_OK


def cmd_check_dns(args: argparse.Namespace) -> int:
    import socket

    from mailgate.commands import dnscheck
    config = _load(args, check_files=False).config
    try:
        findings = dnscheck.check_dns(config, args.domain, dkim_selectors=args.selector or (),
                                      this_host=args.this_host or [socket.getfqdn()])
    except ValueError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(dnscheck.findings_json(findings)) if args.json else dnscheck.render(findings))
    return EXIT_FAILURE if any(f.level == "FAIL" for f in findings) else EXIT_OK


def cmd_import_odoo(args: argparse.Namespace) -> int:
    from mailgate.commands.importodoo import main_import
    return main_import(args.dsn, Path(args.output) if args.output else None,
                       Path(args.secrets_dir) if args.secrets_dir else None, force=args.force)


def cmd_migrate_store(args: argparse.Namespace) -> int:
    import psycopg

    from mailgate.store import is_postgres, open_store
    from mailgate.store.migrate import MigrationError, migrate_store
    if not is_postgres(args.to):
        print("mailgate migrate-store: --to must be a postgresql:// URL", file=sys.stderr)
        return EXIT_USAGE
    try:
        target = open_store(args.to, Path(args.password_file) if args.password_file else None)
        result = migrate_store(Path(args.source), target)
    except (MigrationError, psycopg.Error, OSError) as exc:
        print(f"mailgate migrate-store: {exc}".strip(), file=sys.stderr)
        return EXIT_FAILURE
    for table, count in result.rows.items():
        print(f"{table}: {count} row(s)")
    print("done: set `database:` to the PostgreSQL URL on every gateway, then reload them", file=sys.stderr)
    return EXIT_OK


def cmd_watch_log(args: argparse.Namespace) -> int:
    from mailgate.commands.watchlog import main_watch_log
    config = _load(args, check_files=False).config
    setup_logging()
    return main_watch_log(config, args.file, args.journal, args.once, debug=args.verbose)


def cmd_stats(args: argparse.Namespace) -> int:
    from mailgate.commands.deliverystats import main_stats
    from mailgate.commands.views import default_since
    config = _load(args, check_files=False).config
    since = default_since(args.since, args.all, config.bounces.window_days)
    return main_stats(config, since, args.json, args.prometheus)


def cmd_check_health(args: argparse.Namespace) -> int:
    from mailgate.commands.checkhealth import check_health
    return check_health(_load(args, check_files=False).config, timeout=args.timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    from mailgate.commands.demo import run_demo
    return run_demo(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="configuration file (default: $MAILGATE_CONFIG, then /etc/mailgate/mailgate.yaml)")
    parser = argparse.ArgumentParser(prog="mailgate", parents=[common],
                                     description="Odoo's mail rules for an on-premise Postfix.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    commands.add_parser("demo", parents=[common], help="a private Postfix wired to mailgate, with example mail"
                        ).add_argument("--keep", action="store_true", help="keep the demo's directory")
    commands.add_parser("serve", parents=[common], help="run the milter and lookup listeners")
    commands.add_parser("check-config", parents=[common], help="validate the configuration")
    commands.add_parser("check-health", parents=[common], help="ask the running serve's /healthz (exit 0: healthy)"
                        ).add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    commands.add_parser("deliver", parents=[common], help="hand a message on stdin to Odoo (Postfix pipe)"
                        ).add_argument("--alias", required=True, help="the alias (or catchall, bounce, fallback)")
    postfix = commands.add_parser("postfix-config", parents=[common], help="print main.cf/master.cf settings")
    postfix.add_argument("--part", choices=("main", "master"))
    postfix.add_argument("--mailgate-bin", help="the mailgate command the delivery pipe runs (default: this one)")
    postfix.add_argument("--pipe-user", default="mailgate", help="the user the delivery pipe runs as")

    bounce = commands.add_parser("bounce", parents=[common], help="delivery reports")
    bounce_kinds = bounce.add_subparsers(dest="kind", metavar="KIND")
    bounce_kinds.required = True
    bounce_kinds.add_parser("parse", parents=[common], help="parse one report (JSON)").add_argument(
        "file", nargs="?", help="the report (default and -: stdin)")

    bounces = commands.add_parser("bounces", parents=[common], help="recorded bounces")
    bounces.add_argument("view", choices=("list", "stats"))
    bounces_window = bounces.add_mutually_exclusive_group()
    bounces_window.add_argument("--since", help="7d, 24h, 30m or a date (default: stats, the last "
                                "bounces.window_days days; list, all)")
    bounces_window.add_argument("--all", action="store_true", help="stats over all time (slow on a big store)")
    bounces.add_argument("--address", help="only this recipient (list)")
    bounces.add_argument("--json", action="store_true", help="one JSON object on stdout")

    blacklist = commands.add_parser("blacklist", parents=[common], help="the blacklist of bouncing addresses")
    blacklist.add_argument("action", choices=("list", "add", "remove", "why"))
    blacklist.add_argument("address", nargs="?")
    blacklist.add_argument("--reason", help="recorded with add/remove")
    blacklist.add_argument("--json", action="store_true", help="one JSON object on stdout")

    test = commands.add_parser("test-server", parents=[common], help="Odoo's Test Connection for one server")
    test.add_argument("name")
    test.add_argument("--send-to", metavar="ADDR", help="also send a real test message to ADDR")
    test.add_argument("--timeout", type=float, default=15.0, help="seconds per network step (default 15)")
    test.add_argument("--json", action="store_true", help="one JSON object on stdout")

    oauth = commands.add_parser("oauth", parents=[common], help="OAuth2 for auth: xoauth2 servers")
    oauth_kinds = oauth.add_subparsers(dest="kind", metavar="KIND")
    oauth_kinds.required = True
    oauth_login = oauth_kinds.add_parser("login", parents=[common], help="get and store a server's refresh token")
    oauth_login.add_argument("name")
    oauth_login.add_argument("--flow", choices=("device", "loopback"),
                             help="device code or browser redirect (default: device where the provider has it)")
    oauth_login.add_argument("--port", type=int, default=0, help="the loopback redirect's port (default: any free)")
    oauth_login.add_argument("--wait", type=float, default=900.0, help="seconds to wait for the consent")

    dns = commands.add_parser("check-dns", parents=[common], help="SPF, DKIM, DMARC and MX of a domain")
    dns.add_argument("domain", nargs="?", help="default: every alias domain")
    dns.add_argument("--selector", action="append", metavar="S", help="a DKIM selector to check (repeatable)")
    dns.add_argument("--this-host", action="append", metavar="NAME", help="this host's name or address (MX check)")
    dns.add_argument("--json", action="store_true", help="one JSON object on stdout")

    importer = commands.add_parser("import-odoo", parents=[common], help="write the YAML from an Odoo database")
    importer.add_argument("--dsn", required=True, help="postgresql://user@host/odoo_database")
    importer.add_argument("--output", metavar="FILE", help="where to write the YAML (default: stdout)")
    importer.add_argument("--secrets-dir", metavar="DIR", help="where the 0600 password files go")
    importer.add_argument("--force", action="store_true", help="overwrite an existing output file")

    migrate = commands.add_parser("migrate-store", parents=[common], help="copy a SQLite store into PostgreSQL")
    migrate.add_argument("--from", dest="source", required=True, metavar="SQLITE", help="the SQLite store file")
    migrate.add_argument("--to", required=True, metavar="URL", help="postgresql://user@host/database")
    migrate.add_argument("--password-file", help="the PostgreSQL password (else PG* variables)")

    watch = commands.add_parser("watch-log", parents=[common], help="record delivery status from Postfix's log")
    watch.add_argument("file", nargs="?", help="the log file (default /var/log/mail.log)")
    watch.add_argument("--journal", action="store_true", help="read the systemd journal instead of a file")
    watch.add_argument("--once", action="store_true", help="read what is there, then stop")
    watch.add_argument("-v", "--verbose", action="store_true", help="one line per recorded delivery")

    stats = commands.add_parser("stats", parents=[common], help="sent/deferred/bounced per server and day")
    stats_window = stats.add_mutually_exclusive_group()
    stats_window.add_argument("--since", help="7d, 24h, 30m or a date (default: the last bounces.window_days days)")
    stats_window.add_argument("--all", action="store_true", help="over all time (slow on a big store)")
    stats.add_argument("--json", action="store_true", help="one JSON object on stdout")
    stats.add_argument("--prometheus", action="store_true",
                       help="Prometheus text format (all-time counters, whatever --since says)")

    explain = commands.add_parser("explain", parents=[common], help="show a decision without sending")
    explain_kinds = explain.add_subparsers(dest="kind", metavar="KIND")
    explain_kinds.required = True
    outbound = explain_kinds.add_parser("outbound", parents=[common], help="the outbound decision")
    outbound.add_argument("--from", dest="header_from", required=True, help="the header From")
    outbound.add_argument("--sender", help="the envelope sender the client used")
    outbound.add_argument("--mass", action="store_true", help="treat as mass mail")
    outbound.add_argument("--json", action="store_true", help="one JSON object on stdout")
    inbound = explain_kinds.add_parser("inbound", parents=[common], help="the inbound decision for a message")
    inbound.add_argument("--message", required=True, metavar="FILE.eml", help="the message (- for stdin)")
    inbound.add_argument("--rcpt", action="append", metavar="ADDR", help="an envelope recipient (repeatable)")
    inbound.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return parser


HANDLERS: dict[str | tuple[str, str | None], Callable[[argparse.Namespace], int]] = {
    "demo": cmd_demo,
    "serve": cmd_serve,
    "deliver": cmd_deliver,
    "check-config": cmd_check_config,
    "check-health": cmd_check_health,
    "postfix-config": cmd_postfix_config,
    ("explain", "outbound"): cmd_explain_outbound,
    ("explain", "inbound"): cmd_explain_inbound,
    ("bounce", "parse"): cmd_bounce_parse,
    "bounces": cmd_bounces,
    "test-server": cmd_test_server,
    ("oauth", "login"): cmd_oauth_login,
    "check-dns": cmd_check_dns,
    "import-odoo": cmd_import_odoo,
    "migrate-store": cmd_migrate_store,
    "watch-log": cmd_watch_log,
    "stats": cmd_stats,
    "blacklist": cmd_blacklist,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = HANDLERS.get((args.command, getattr(args, "kind", None))) or HANDLERS[args.command]
    try:
        return handler(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return EXIT["interrupted"]


if __name__ == "__main__":
    sys.exit(main())
