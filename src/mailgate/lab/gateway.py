"""A whole gateway on loopback: private Postfix + `mailgate serve` + sinks as upstream servers.

Postfix is wired with what `mailgate postfix-config` prints (main.cf settings and the per-server
transports), so the demo and the end-to-end tests exercise the operator's wiring, not a copy.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import smtplib
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mailgate.commands.postfixconf import (
    INBOUND_LISTENER,
    SUBMISSION_LISTENER,
    Wiring,
    main_settings,
    odoo_pipe_service,
    transport_service,
)
from mailgate.configfile import load_config
from mailgate.infra.clock import OFFSET_FILE_VARIABLE
from mailgate.infra.sockets import socket_is_listening
from mailgate.lab.certs import make_ca_and_cert
from mailgate.lab.odoo_stub import OdooStub
from mailgate.lab.ports import free_port
from mailgate.lab.postfix import PrivatePostfix
from mailgate.lab.sinks import Sink
from mailgate.rules.tokens import TokenSigner
from mailgate.store import open_store

SASL_USER, SASL_PASSWORD = "odoo@mycompany.com", "relay-password"
ODOO_PASSWORD = "odoo-admin-password"
PIPE_USER = "nobody"  # pipe(8) never runs as root; Debian always has this user
GONE = "gone@customer.example"  # every upstream sink refuses it with 550 5.1.1
BLOCKING = "anyone@blocking.example"  # every upstream sink refuses it as from a block-listed client
STUB_ALIASES = {"sales": "odoo:crm.lead", "support": "odoo:helpdesk.ticket", "commercial": "odoo:crm.lead"}
INCOMING_LOCAL_ALIAS = "commercial"


class OdooServer(Protocol):
    """What the gateway needs of a real Odoo to deliver to it (mailgate.lab.odoo.LabOdoo)."""

    @property
    def url(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def login(self) -> str: ...
    @property
    def password(self) -> str: ...


@dataclass
class Submitted:
    queue_id: str
    reply: str


def _code_under_test() -> dict[str, str]:
    """With PYTHONPATH set (a source tree ahead of the installed one), the pipe to `mailgate
    deliver` runs the same code as `serve`: Postfix passes no variable it is not told to."""
    path = os.environ.get("PYTHONPATH")
    if not path:
        return {}
    return {"import_environment": "MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ XAUTHORITY DISPLAY LANG=C POSTLOG_SERVICE "
                                  f"POSTLOG_HOSTNAME PYTHONPATH={path}",
            "export_environment": "TZ MAIL_CONFIG LANG PYTHONPATH"}


class LabGateway:
    """Three upstream sinks, like a typical Odoo set-up:

    - `transactional`: STARTTLS + AUTH, may send for mycompany.com (priority 10)
    - `partner`: plain SMTP, may send only for partner.example (priority 5)
    - `mass`: TLS on connect, no filter (priority 20), the mass server
    Postfix listens on `submission` (ORIGINATING, the outbound role), `mass` (mass listener) and
    `inbound` (INBOUND: the public port-25 role). Accepted alias mail goes through the pipe to
    `mailgate deliver` and on to `odoo`, a local XML-RPC stand-in for Odoo.
    """

    def __init__(self, base: Path, extra_config: str = "", *, main_cf_extra: dict[str, str] | None = None,
                 before_start: Callable[[LabGateway], None] | None = None, database: str | None = None,
                 secret_file: Path | None = None, alias_domains: str | None = None,
                 extra_sinks: Callable[[tuple[Path, Path]], dict[str, Sink]] | None = None,
                 extra_servers: Callable[[LabGateway, Path], str] | None = None,
                 odoo: OdooServer | None = None, aliases: dict[str, str] | None = None):
        """`main_cf_extra` overrides Postfix settings (e.g. a milter chain); `before_start` runs
        after mailgate is up and before Postfix starts (e.g. to start another milter);
        `database` and `secret_file` let several gateways share one state and one token key;
        `alias_domains` replaces the one-domain keys (mycompany.com, notifications) with YAML
        of its own; `extra_sinks` (given the TLS certificate and key) makes more sinks, started
        with the others, and `extra_servers` (given the gateway and the CA file) writes their
        `servers:` items; `odoo` is a real Odoo to deliver to instead of the stand-in (started
        and stopped by the caller), `aliases` the business aliases (name -> target) in place of
        the stand-in's."""
        self.base = Path(base)
        self.database = database or "state/mailgate.sqlite3"
        self.secret_file = secret_file or Path("secret")
        self.extra_config = extra_config
        self.alias_domains = alias_domains or "alias_domain: mycompany.com\ndefault_from: notifications\n"
        self.main_cf_extra = dict(main_cf_extra or {})
        self.before_start = before_start
        self.extra_sinks = extra_sinks
        self.extra_servers = extra_servers
        self.sinks: dict[str, Sink] = {}
        self.pf: PrivatePostfix | None = None
        self.process: subprocess.Popen | None = None
        self.config_path = self.base / "mailgate.yaml"
        self.log_path = self.base / "mailgate.log"
        self.clock_file = self.base / "clock-offset"
        self.odoo = OdooStub(database="odoo", login="admin", password=ODOO_PASSWORD)
        self.metrics_port = free_port()
        self.real_odoo = odoo
        self.aliases = dict(STUB_ALIASES if aliases is None else aliases)

    # -- set-up -----------------------------------------------------------------------------

    def start(self) -> LabGateway:
        certs = make_ca_and_cert(self.base / "tls")
        cert = (certs.cert, certs.key)
        gone = {GONE: "550 5.1.1 <gone@customer.example>: Recipient address rejected: User unknown",
                BLOCKING: "554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using zen.example.net"}
        self.sinks = {
            "transactional": Sink(security="starttls", cert=cert, auth=(SASL_USER, SASL_PASSWORD),
                                  name="transactional", reject=gone),
            "partner": Sink(name="partner", reject=gone),
            "mass": Sink(security="tls", cert=cert, name="mass", reject=gone),
            "default": Sink(name="default"),
            **(self.extra_sinks(cert) if self.extra_sinks else {}),
        }
        for sink in self.sinks.values():
            sink.start()
        if self.real_odoo is None:
            self.odoo.start()
        self._write_config(certs.ca_cert)
        config = load_config(self.config_path).config
        self.start_mailgate()
        main_cf = dict(main_settings(config))
        main_cf["relayhost"] = f"[127.0.0.1]:{self.sinks['default'].port}"
        main_cf.update(_code_under_test())
        main_cf.update(self.main_cf_extra)
        self.pf = PrivatePostfix(self.base / "pf", listeners={
            name: {"milter_macro_daemon_name": role, "smtpd_policy_service_policy_context": role}
            for name, role in (("submission", SUBMISSION_LISTENER), ("mass", "mass"), ("inbound", INBOUND_LISTENER))
        }, main_cf=main_cf)
        for server in config.servers:
            self.pf.add_master_service("\n".join(transport_service(config, server)) + "\n")
        wiring = Wiring(mailgate_bin=str(Path(sys.executable).with_name("mailgate")),
                        config_path=str(self.config_path), pipe_user=PIPE_USER)
        self.pf.add_master_service("\n".join(odoo_pipe_service(wiring)) + "\n")
        if self.before_start:
            self.before_start(self)
        self.pf.start()
        return self

    def _write_config(self, ca_file: Path) -> None:
        secrets = self.base / "secrets"
        secrets.mkdir(exist_ok=True)
        password = secrets / "transactional"
        password.write_text(SASL_PASSWORD + "\n")
        password.chmod(0o600)
        odoo_password = secrets / "odoo"
        target: OdooServer = self.real_odoo or self.odoo
        odoo_password.write_text(target.password + "\n")
        odoo_password.chmod(0o600)
        user = pwd.getpwnam(PIPE_USER)
        os.chown(odoo_password, user.pw_uid, user.pw_gid)
        self.clock_file.write_text("0\n")
        s = self.sinks
        self.config_path.write_text(self.alias_domains + textwrap.dedent(f"""\
            servers:
              - {{name: transactional, host: localhost, port: {s['transactional'].port}, security: starttls,
                  username: "{SASL_USER}", password_file: secrets/transactional, tls_ca_file: {ca_file},
                  from_filter: mycompany.com, priority: 10}}
              - {{name: partner, host: 127.0.0.1, port: {s['partner'].port}, security: none,
                  from_filter: partner.example, priority: 5}}
              - {{name: mass, host: localhost, port: {s['mass'].port}, security: tls, tls_ca_file: {ca_file},
                  from_filter: null, priority: 20}}
            {{extra_servers}}mass_mail: {{server: mass, listeners: [mass]}}
            allowed_alias_domains: [mycompany.com, othercompany.example]
            aliases:
            {self._aliases_yaml()}
            odoo: {{url: "{target.url}", database: {target.database}, user: {target.login},
                    password_file: secrets/odoo}}
            listen:
              milter: unix:{self.base}/milter.sock
              lookup: unix:{self.base}/lookup.sock
              policy: unix:{self.base}/policy.sock
              metrics: inet:{self.metrics_port}@127.0.0.1
            database: "{self.database}"
            secret_file: {self.secret_file}
            """).replace("{extra_servers}", self.extra_servers(self, ca_file) if self.extra_servers else "")
            + self.extra_config)

    def _aliases_yaml(self) -> str:
        lines = []
        for name, target in self.aliases.items():
            local = ", incoming_local: true" if name == INCOMING_LOCAL_ALIAS else ""
            lines.append(f'  {name}: {{target: "{target}"{local}}}')
        return "\n            ".join(lines)

    def start_mailgate(self) -> None:
        """Start `mailgate serve` and wait until both sockets accept connections."""
        config = load_config(self.config_path).config
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "serve", "--config", str(self.config_path)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1", OFFSET_FILE_VARIABLE: str(self.clock_file)})
        log.close()
        specs = [config.listen.milter, config.listen.lookup, config.listen.policy]
        deadline = time.monotonic() + 20
        while not all(socket_is_listening(spec) for spec in specs):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mailgate serve did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.05)

    def stop_mailgate(self, sig: int = signal.SIGTERM) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(10)
        self.process = None
        return code

    def stop(self) -> None:
        if self.pf is not None:
            self.pf.stop()
        self.stop_mailgate()
        self.odoo.stop()
        for sink in self.sinks.values():
            sink.stop()

    def __enter__(self) -> LabGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use ----------------------------------------------------------------------------------

    def submit(self, message: bytes, sender: str, recipients: list[str], listener: str = "submission") -> Submitted:
        """SMTP to a listener; returns the queue id, or raises SMTPResponseException on refusal."""
        assert self.pf is not None
        with smtplib.SMTP("127.0.0.1", self.pf.port(listener), timeout=30) as client:
            client.ehlo("lab.client")
            code, reply = client.mail(sender)
            if code != 250:
                raise smtplib.SMTPResponseException(code, reply)
            for rcpt in recipients:
                code, reply = client.rcpt(rcpt)
                if code not in (250, 251):
                    raise smtplib.SMTPResponseException(code, reply)
            code, reply = client.data(message)
        if code != 250:
            raise smtplib.SMTPResponseException(code, reply)
        found = re.search(rb"queued as (\w+)", reply)
        return Submitted(found.group(1).decode() if found else "", reply.decode(errors="replace"))

    def delivery(self, queue_id: str, recipient: str, timeout: float = 30) -> tuple[str, int]:
        """(sink name, message index) once Postfix logged the delivery of queue_id to recipient."""
        assert self.pf is not None
        found = self.pf.wait_for_log(
            rf"{queue_id}: to=<{re.escape(recipient)}>, relay=\S+?:(\d+),.*status=sent \(250 saved (\d+)\)", timeout)
        port, index = int(found.group(1)), int(found.group(2))
        for name, sink in self.sinks.items():
            if sink.port == port:
                return name, index
        raise LookupError(f"no sink on port {port}")

    def move_clock(self, seconds: float) -> None:
        """Move the gateway's clock forward (the loop window, the quota day) without sleeping."""
        offset = float(self.clock_file.read_text() or 0) + seconds
        staged = self.clock_file.with_name(self.clock_file.name + ".new")
        staged.write_text(f"{offset}\n")
        os.replace(staged, self.clock_file)  # a reader never sees the file empty (offset 0)

    def token_signer(self) -> TokenSigner:
        """A signer for this gateway's tokens: its secret and its store's identity."""
        config = load_config(self.config_path).config
        store = open_store(config.database, config.database_password_file)
        try:
            return TokenSigner(Path(config.secret_file).read_bytes().strip(), store.store_id())
        finally:
            store.close()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def scrape(self) -> str:
        """The metrics listener's /metrics, as Prometheus reads it."""
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=10) as answer:
            return answer.read().decode()

    def mailgate_log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
