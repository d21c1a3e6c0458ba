"""Run the operator's example set-ups (postfix-examples/*/) in the lab, changed as little as possible.

The examples are written for a real Debian host: sockets under /run/mailgate, ports 25 and 587,
the snakeoil certificate, the `mailgate` user. A test cannot use any of those, so every
difference is listed once, by name, in `rewrites()`; everything else in the files runs exactly
as shipped. What an example leaves to Debian's defaults but a private instance must set (its
own directories and log file, no DNS) is appended, also by name, in `instance_settings()`.
"""

from __future__ import annotations

import os
import pwd
import ssl
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from mailgate.lab.certs import CertBundle
from mailgate.lab.gateway import PIPE_USER, LabGateway
from mailgate.lab.postfix import POSTFIX, PrivatePostfix

POSTALIAS = "/usr/sbin/postalias"

EXAMPLES = Path(__file__).resolve().parent.parent / "postfix-examples"

# Listener name (as `LabGateway.submit(listener=...)` and `PrivatePostfix.port()` know it) ->
# how its master.cf line starts in the examples.
LISTENERS = {
    "submission": "127.0.0.1:10025",  # Odoo on this host (local-odoo)
    "mass": "127.0.0.1:10026",        # mass_mail.listeners: [mass]
    "sasl": "submission",             # port 587, STARTTLS + AUTH (remote-odoo-sasl)
    "inbound": "smtp",                # port 25 (inbound)
}

SASL_REALM, SASL_LOGIN, SASL_SECRET = "mycompany.com", "odoo", "odoo-submission-secret"
"""The Odoo host's login on the 587 listener: `odoo@mycompany.com` in Cyrus's sasldb."""


@dataclass(frozen=True)
class LabValues:
    """Where the lab keeps what a real host keeps in /run, /etc and on ports 25 and 587. Only
    `base` is needed from the start; a value the lab has not settled yet rewrites nothing."""

    base: Path
    ports: dict[str, int] = field(default_factory=dict)
    certs: CertBundle | None = None
    relay_port: int | None = None
    mailgate_config: Path | None = None
    aliases: Path | None = None
    mailgate_bin: str = str(Path(sys.executable).with_name("mailgate"))
    pipe_user: str = PIPE_USER

    @property
    def sasldb(self) -> Path:
        return self.base / "sasldb2"

    @property
    def opendkim_run(self) -> Path:
        return self.base / "opendkim"

    @property
    def dkim_keys(self) -> Path:
        return self.base / "dkimkeys"


def rewrites(lab: LabValues) -> dict[str, tuple[str, str]]:
    """Each difference between an example file and the lab: name -> (text in the example, text in
    the lab). Nothing else is changed."""
    table = {
        "mailgate's sockets": ("unix:/run/mailgate/", f"unix:{lab.base}/"),
        "OpenDKIM's run directory (socket, pid)": ("/run/opendkim/", f"{lab.opendkim_run}/"),
        "OpenDKIM's key": ("/etc/dkimkeys/", f"{lab.dkim_keys}/"),
        # A host adds postfix to group opendkim (adduser); the lab does not touch system groups.
        "OpenDKIM's socket group": ("\nUserID                  opendkim\n", "\nUserID opendkim:postfix\n"),
        "sasldb": ("sasldb_path: /etc/sasldb2", f"sasldb_path: {lab.sasldb}"),
        "public interfaces": ("inet_interfaces = all", "inet_interfaces = loopback-only"),
        "pipe user": (" user=mailgate ", f" user={lab.pipe_user} "),
        "mailgate command": ("argv=/usr/local/bin/mailgate ", f"argv={lab.mailgate_bin} "),
    }
    if lab.certs is not None:
        table |= {
            "server certificate": ("/etc/ssl/certs/ssl-cert-snakeoil.pem", str(lab.certs.cert)),
            "server key": ("/etc/ssl/private/ssl-cert-snakeoil.key", str(lab.certs.key)),
            "upstream CAs (the sinks' certificates come from the lab CA)":
                ("smtp_tls_CApath = /etc/ssl/certs", f"smtp_tls_CAfile = {lab.certs.ca_cert}"),
        }
    if lab.relay_port is not None:
        table["default route (the lab's catch-all sink)"] = (
            "\nrelayhost =\n", f"\nrelayhost = [127.0.0.1]:{lab.relay_port}\n")
    if lab.mailgate_config is not None:
        table["mailgate configuration"] = ("--config /etc/mailgate/mailgate.yaml", f"--config {lab.mailgate_config}")
    if lab.aliases is not None:
        table["local aliases (a copy, built by postalias)"] = ("hash:/etc/aliases", f"hash:{lab.aliases}")
    for name, port in lab.ports.items():
        table[f"listener {LISTENERS[name]}"] = (f"\n{LISTENERS[name]} inet ", f"\n127.0.0.1:{port} inet ")
    return table


def rewrite(text: str, lab: LabValues) -> str:
    for before, after in rewrites(lab).values():
        text = text.replace(before, after)
    return text


def instance_settings(pf: PrivatePostfix) -> dict[str, str]:
    """main.cf settings the examples leave to Debian's defaults (/etc/postfix, /var/spool/postfix,
    syslog, DNS) and a private instance must not: its own directories, a plain log file, and
    no DNS on a box without network (next hops are 127.0.0.1 and localhost)."""
    return {
        "config_directory": str(pf.config_dir),
        "queue_directory": str(pf.queue_dir),
        "data_directory": str(pf.data_dir),
        "maillog_file": str(pf.maillog),
        "maillog_file_prefixes": str(pf.basedir),
        "smtp_dns_support_level": "disabled",
    }


def listeners_of(folder: str) -> list[str]:
    """The lab listeners an example's master.cf defines."""
    master = (EXAMPLES / folder / "master.cf").read_text()
    return [name for name, start in LISTENERS.items() if f"\n{start} inet " in master]


class ExamplePostfix(PrivatePostfix):
    """A private Postfix whose main.cf and master.cf are an example folder's, rewritten with `lab`
    plus this instance's own listener ports and aliases."""

    def __init__(self, basedir: Path, folder: str, lab: LabValues):
        super().__init__(basedir, listeners={name: {} for name in listeners_of(folder)})
        self.folder = EXAMPLES / folder
        self.lab = replace(lab, ports={name: self.port(name) for name in listeners_of(folder)},
                           aliases=self.config_dir / "aliases")

    def _render_main_cf(self) -> str:
        extra = "".join(f"{key} = {value}\n" for key, value in instance_settings(self).items())
        return rewrite((self.folder / "main.cf").read_text(), self.lab) + "\n# lab instance\n" + extra

    def _render_master_cf(self) -> str:
        return rewrite((self.folder / "master.cf").read_text(), self.lab)

    def write_config(self) -> None:
        """main.cf, master.cf and what they name that a host has in /etc: the Cyrus SASL settings
        (where Debian's smtpd reads them, $config_directory/sasl/) with their sasldb, and the
        aliases database (newaliases' job on a host)."""
        self._prepare_dirs()
        (self.config_dir / "main.cf").write_text(self._render_main_cf())
        (self.config_dir / "master.cf").write_text(self._render_master_cf())
        if (self.folder / "smtpd.conf").exists():
            (self.config_dir / "sasl").mkdir(exist_ok=True)
            (self.config_dir / "sasl" / "smtpd.conf").write_text(
                rewrite((self.folder / "smtpd.conf").read_text(), self.lab))
            make_sasldb(self.lab.sasldb)
        self.lab.aliases.write_text("postmaster: root\n")
        subprocess.run([POSTALIAS, "-c", str(self.config_dir), f"hash:{self.lab.aliases}"],
                       check=True, capture_output=True, timeout=30)

    def start(self) -> None:
        self.write_config()
        super().start()

    def check(self) -> subprocess.CompletedProcess[str]:
        """`postfix -c DIR check` on the written configuration (it also creates the queue dirs)."""
        return subprocess.run([POSTFIX, "-c", str(self.config_dir), "check"],
                              capture_output=True, text=True, timeout=60)


def make_sasldb(path: Path) -> None:
    """The Odoo host's login, made the way README.md tells the operator (saslpasswd2), readable
    by group postfix as smtpd needs."""
    path.unlink(missing_ok=True)
    subprocess.run(["saslpasswd2", "-f", str(path), "-p", "-c", "-u", SASL_REALM, SASL_LOGIN],
                   input=SASL_SECRET.encode(), check=True, capture_output=True, timeout=30)
    os.chown(path, 0, pwd.getpwnam("postfix").pw_gid)
    os.chmod(path, 0o640)


def lab_values(gw: LabGateway) -> LabValues:
    """The lab values of a started gateway: its sockets, certificates, catch-all sink and config."""
    tls = gw.base / "tls"
    return LabValues(base=gw.base, certs=CertBundle(tls / "ca.pem", tls / "cert.pem", tls / "key.pem"),
                     relay_port=gw.sinks["default"].port, mailgate_config=gw.config_path)


def example_postfix(gw: LabGateway, folder: str) -> ExamplePostfix:
    """The example's Postfix in front of a lab gateway's sinks, `mailgate serve` and Odoo stand-in.

    The lab's mailgate.yaml names the same servers as the example configuration
    (`transactional`, `mass`, plus `partner`), so the example's mg-transactional and mg-mass
    transports serve it unchanged: the relays' addresses come from mailgate's transport answer
    (`mg-transactional:[localhost]:PORT`), not from Postfix's files.
    """
    return ExamplePostfix(gw.base / f"pf-{folder}", folder, lab_values(gw))


def tls_context(certs: CertBundle) -> ssl.SSLContext:
    """What a careful Odoo does: verify the gateway's certificate (here: against the lab CA)."""
    return ssl.create_default_context(cafile=str(certs.ca_cert))
