"""A real Odoo for the end-to-end tests: from a kit tarball or from a source tree the user has.

The stand-in of `mailgate.lab.odoo_stub` answers what we believe Odoo answers; this module runs
Odoo itself, so that the tests can ask the real thing. Where an Odoo comes from:

- `MAILGATE_ODOO_SRC=/path/to/odoo` (a checkout or source build, with `odoo-bin`), run with
  `MAILGATE_ODOO_PYTHON` or the system python3;
- otherwise the kit tarballs `odoo-<series>-<mail|mass_mailing>.tar.gz` in `MAILGATE_ODOO_KITS`
  (default: `../shared/odoo` beside the repository). Each tarball is unpacked once into a cache
  directory keyed by its name and size, so a later run starts at once. The versions are the
  tarballs found: a new Odoo series is one more tarball, no new code.

Odoo needs its own PostgreSQL role (it refuses to connect as the superuser): the role is created
in the lab's private cluster, with a random password, and each `LabOdoo` gets its own database
with `mail` (or `mass_mailing`) installed, an HTTP port on loopback and its own data directory.
The server runs threaded with no cron threads, so mail queues move only when a test asks.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

from mailgate.lab.ports import LOOPBACK, free_port
from mailgate.lab.postgres import PrivatePostgres

SOURCE_VARIABLE = "MAILGATE_ODOO_SRC"
PYTHON_VARIABLE = "MAILGATE_ODOO_PYTHON"
KITS_VARIABLE = "MAILGATE_ODOO_KITS"
CACHE_VARIABLE = "MAILGATE_ODOO_CACHE"
SYSTEM_PYTHON = "/usr/bin/python3"
DEFAULT_CACHE = Path("/var/tmp/mailgate-odoo-kits")
MAIL, MASS_MAILING = "mail", "mass_mailing"
ODOO_ROLE = "odoo"
ADMIN_LOGIN = ADMIN_PASSWORD = "admin"  # what a new database's administrator gets
GATEWAY_SERVER_NAME = "mailgate"
MAIL_QUEUE_CRON = "mail.ir_cron_mail_scheduler_action"
MASS_MAILING_CRON = "mass_mailing.ir_cron_mass_mailing_queue"
_KIT_NAME = re.compile(r"odoo-(?P<series>\d+\.\d+)-(?P<module>mail|mass_mailing)\.tar\.gz")
_VERSION_INFO = re.compile(r"^version_info\s*=\s*\(\s*(?:'saas~)?(\d+)'?\s*,\s*(\d+)", re.MULTILINE)
# What `odoo-bin` imports before anything else: missing ones mean the Debian packages are not in.
_PROBE_IMPORTS = "import psycopg2, lxml, werkzeug, babel, passlib, jinja2, PIL, dateutil, reportlab"
_INSTALL_TIMEOUT = 600.0
_START_TIMEOUT = 90.0


class OdooError(RuntimeError):
    """Odoo could not be installed or started; carries the tail of its log."""


@dataclass(frozen=True)
class OdooSource:
    """Where one Odoo comes from: a tarball still to unpack, or a source tree."""

    series: str          # "17.0"
    modules: frozenset[str]  # what can be installed: {"mail"} or {"mail", "mass_mailing"}
    tarball: Path | None = None
    tree: Path | None = None

    @property
    def major(self) -> int:
        return int(self.series.split(".")[0])

    def label(self) -> str:
        return str(self.tarball or self.tree)


def repository_root() -> Path:
    """The checkout this module runs from (src/mailgate/lab/odoo.py is three levels down)."""
    return Path(__file__).resolve().parents[3]


def kits_dir() -> Path | None:
    """`MAILGATE_ODOO_KITS`, or `../shared/odoo` beside the repository when it exists."""
    configured = os.environ.get(KITS_VARIABLE)
    if configured:
        return Path(configured)
    default = repository_root().parent / "shared" / "odoo"
    return default if default.is_dir() else None


def series_of_tree(tree: Path) -> str | None:
    """The series ("18.0") that `odoo/release.py` of a source tree declares, or None."""
    try:
        found = _VERSION_INFO.search((tree / "odoo" / "release.py").read_text())
    except OSError:
        return None
    return f"{found.group(1)}.{found.group(2)}" if found else None


def addons_paths(tree: Path) -> list[Path]:
    """A kit keeps every addon in odoo/addons; a full checkout has addons/ beside it."""
    return [path for path in (tree / "odoo" / "addons", tree / "addons") if path.is_dir()]


def installable(tree: Path, module: str) -> bool:
    """A real addon, not one of the kits' manifest-only stubs (which have no models)."""
    return any((path / module / "models").is_dir() for path in addons_paths(tree))


def discover() -> dict[str, OdooSource]:
    """Every Odoo this machine offers, by series: the source tree if one is configured, else the kits.

    One series may come as a mail and a mass_mailing tarball; the mass_mailing one installs both.
    """
    tree = os.environ.get(SOURCE_VARIABLE)
    if tree:
        path = Path(tree)
        series = series_of_tree(path)
        if series is None:
            return {}
        modules = frozenset(m for m in (MAIL, MASS_MAILING) if installable(path, m))
        return {series: OdooSource(series, modules, tree=path)}
    directory = kits_dir()
    if directory is None or not directory.is_dir():
        return {}
    found: dict[str, OdooSource] = {}
    for tarball in sorted(directory.glob("odoo-*.tar.gz")):
        match = _KIT_NAME.fullmatch(tarball.name)
        if match is None:
            continue
        series, module = match["series"], match["module"]
        modules = frozenset({MAIL, module})
        known = found.get(series)
        if known is None or len(modules) > len(known.modules):
            found[series] = OdooSource(series, modules, tarball=tarball)
    return dict(sorted(found.items(), key=lambda item: tuple(int(p) for p in item[0].split("."))))


def odoo_python() -> str:
    return os.environ.get(PYTHON_VARIABLE) or SYSTEM_PYTHON


def unavailable_reason() -> str | None:
    """Why no Odoo can run here (None when one can): no source, or Odoo's libraries missing."""
    if not discover():
        return (f"no Odoo found: set {SOURCE_VARIABLE}=/path/to/odoo, or {KITS_VARIABLE} to a directory "
                "of odoo-<series>-<mail|mass_mailing>.tar.gz kits")
    python = odoo_python()
    try:
        probe = subprocess.run([python, "-c", _PROBE_IMPORTS], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run Odoo's python {python}: {exc}"
    if probe.returncode != 0:
        last = probe.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return f"Odoo's libraries are missing for {python} ({''.join(last)}): run scripts/install-deps"
    return None


def unpacked_tree(source: OdooSource, cache: Path | None = None) -> Path:
    """The source tree of `source`: the configured tree, or the tarball unpacked once into the cache."""
    if source.tree is not None:
        return source.tree
    assert source.tarball is not None
    cache = cache or Path(os.environ.get(CACHE_VARIABLE) or DEFAULT_CACHE)
    key = f"{source.tarball.name.removesuffix('.tar.gz')}-{source.tarball.stat().st_size}"
    target = cache / key
    if not (target / "odoo-bin").exists():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache))
        try:
            subprocess.run(["tar", "-xzf", str(source.tarball), "-C", str(staging)], check=True,
                           capture_output=True)
            [top] = [entry for entry in staging.iterdir() if entry.is_dir()]
            try:
                os.rename(top, target)  # atomic: a parallel run sees all of it or nothing
            except OSError:
                if not (target / "odoo-bin").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_role(postgres: PrivatePostgres) -> str:
    """The `odoo` login role in the lab cluster (created once per cluster); returns its password."""
    from psycopg import sql
    password_file = postgres.basedir / "odoo-role.pw"
    if password_file.exists():
        return password_file.read_text().strip()
    password = secrets.token_urlsafe(18)
    postgres.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
        sql.Identifier(ODOO_ROLE), sql.Literal(password)))
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    return password


class OdooRpc:
    """XML-RPC as an integrator calls Odoo: `call(model, method, *args, **kwargs)` as admin."""

    def __init__(self, url: str, database: str, login: str = ADMIN_LOGIN, password: str = ADMIN_PASSWORD):
        self.url, self.database, self.login, self.password = url, database, login, password
        self._uid: int | None = None

    @property
    def uid(self) -> int:
        if self._uid is None:
            with xmlrpc.client.ServerProxy(f"{self.url}/xmlrpc/2/common") as common:
                uid = common.authenticate(self.database, self.login, self.password, {})
            if not uid:
                raise OdooError(f"login {self.login!r} refused by {self.url} ({self.database})")
            self._uid = int(cast(int, uid))
        return self._uid

    def call(self, model: str, method: str, *args: Any, **kwargs: Any) -> Any:
        with xmlrpc.client.ServerProxy(f"{self.url}/xmlrpc/2/object", allow_none=True) as proxy:
            return proxy.execute_kw(self.database, self.uid, self.password, model, method, list(args), kwargs)

    def call_returning_none(self, model: str, method: str, *args: Any, **kwargs: Any) -> None:
        """A method that returns None: Odoo runs and commits it, then fails to marshal the answer."""
        try:
            self.call(model, method, *args, **kwargs)
        except xmlrpc.client.Fault as fault:
            if "cannot marshal None" not in fault.faultString:
                raise

    def record_id(self, xmlid: str) -> int:
        module, name = xmlid.split(".", 1)
        [row] = self.call("ir.model.data", "search_read", [("module", "=", module), ("name", "=", name)],
                          fields=["res_id"])
        return int(row["res_id"])

    def run_cron(self, xmlid: str) -> None:
        """Run a scheduled action now (the lab's Odoo has no cron threads of its own)."""
        self.call("ir.cron", "method_direct_trigger", [self.record_id(xmlid)])

    def model_id(self, model: str) -> int:
        [found] = self.call("ir.model", "search", [("model", "=", model)])
        return int(found)


def hand_mail_to_gateway(rpc: OdooRpc, series_major: int, *, host: str, port: int, alias_domain: str,
                         bounce_alias: str = "bounce", catchall_alias: str = "catchall",
                         default_from: str = "notifications") -> int:
    """The Odoo side of the README's "Moving from Odoo's own mail settings", done over XML-RPC.

    One outgoing server, the gateway's submission listener (no encryption, no login, no From
    filter, sequence 1), every other server archived, so that Odoo sends everything there with its
    bounce address as MAIL FROM. The alias domain keeps its bounce and catchall aliases. Its
    default From is cleared in 17.0 and 18.0, which then pass the author's own From through for
    mailgate to rewrite; 19.0 writes the default From into every notification itself (and fails
    to send one when it is empty), so there it stays. Returns the outgoing server's id.
    """
    others = rpc.call("ir.mail_server", "search", [("name", "!=", GATEWAY_SERVER_NAME)])
    if others:
        rpc.call("ir.mail_server", "write", others, {"active": False})
    server = {"name": GATEWAY_SERVER_NAME, "smtp_host": host, "smtp_port": port, "smtp_encryption": "none",
              "smtp_user": False, "smtp_pass": False, "from_filter": False,
              "sequence": 1, "active": True}
    found = rpc.call("ir.mail_server", "search", [("name", "=", GATEWAY_SERVER_NAME)],
                     context={"active_test": False})
    if found:
        rpc.call("ir.mail_server", "write", found, server)
        server_id = int(found[0])
    else:
        server_id = int(rpc.call("ir.mail_server", "create", server))
    domain = {"name": alias_domain, "bounce_alias": bounce_alias, "catchall_alias": catchall_alias,
              "default_from": default_from if series_major >= 19 else False}
    existing = rpc.call("mail.alias.domain", "search", [("name", "=", alias_domain)])
    if existing:
        rpc.call("mail.alias.domain", "write", existing, domain)
    else:
        rpc.call("mail.alias.domain", "create", domain)
    return server_id


def ensure_alias(rpc: OdooRpc, name: str, model: str, alias_domain: str) -> int:
    """A business alias `name@alias_domain` that creates `model` records, open to everyone."""
    [domain_id] = rpc.call("mail.alias.domain", "search", [("name", "=", alias_domain)])
    found = rpc.call("mail.alias", "search", [("alias_name", "=", name), ("alias_domain_id", "=", domain_id)])
    if found:
        return int(found[0])
    return int(rpc.call("mail.alias", "create", {"alias_name": name, "alias_model_id": rpc.model_id(model),
                                                 "alias_domain_id": domain_id, "alias_contact": "everyone"}))


class LabOdoo:
    """One Odoo server with one fresh database, on loopback; `start()` installs, then serves."""

    def __init__(self, base: Path, source: OdooSource, postgres: PrivatePostgres, *, module: str = MAIL,
                 database: str | None = None, python: str | None = None) -> None:
        if module not in source.modules:
            raise ValueError(f"{source.label()} cannot install {module!r} (it offers {sorted(source.modules)})")
        self.base = Path(base)
        self.source = source
        self.postgres = postgres
        self.module = module
        self.database = database or f"mg_{source.series.replace('.', '')}_{module}"
        self.login, self.password = ADMIN_LOGIN, ADMIN_PASSWORD
        self.python = python or odoo_python()
        self.port = 0
        self.tree: Path | None = None
        self.config_path = self.base / "odoo.conf"
        self.logfile = self.base / "odoo.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.install_seconds = 0.0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def series(self) -> str:
        return self.source.series

    def dsn(self) -> str:
        """A libpq URI for Odoo's own database, as Odoo's role (what `mailgate import-odoo` reads)."""
        password = quote(ensure_role(self.postgres), safe="")
        return f"postgresql://{ODOO_ROLE}:{password}@{LOOPBACK}:{self.postgres.port}/{quote(self.database)}"

    def rpc(self) -> OdooRpc:
        return OdooRpc(self.url, self.database, self.login, self.password)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> LabOdoo:
        """Unpack if needed, install the module into a new database, then serve and wait for health."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.tree = unpacked_tree(self.source)
        role_password = ensure_role(self.postgres)
        self.port = free_port()
        self._write_config(role_password)
        began = time.monotonic()
        install = [self.python, str(self.tree / "odoo-bin"), "-c", str(self.config_path), "-d", self.database,
                   "-i", self.module, "--stop-after-init", "--no-http"]
        with open(self.logfile, "ab") as log:
            result = subprocess.run(install, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=_INSTALL_TIMEOUT, cwd=self.base)
        self.install_seconds = time.monotonic() - began
        if result.returncode != 0:
            raise OdooError(f"odoo-bin -i {self.module} exited {result.returncode}\n{self.log_tail()}")
        self.start_server()
        return self

    def start_server(self) -> None:
        """Serve the installed database (again, on the same port) and wait until /web/health answers."""
        if self.process is not None:
            return
        assert self.tree is not None, "start() first"
        log = open(self.logfile, "ab")
        self.process = subprocess.Popen(
            [self.python, str(self.tree / "odoo-bin"), "-c", str(self.config_path), "-d", self.database,
             f"--db-filter=^{self.database}$"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.base, start_new_session=True)
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop_server()
                raise OdooError(f"Odoo did not answer on {self.url}/web/health\n{self.log_tail()}")
            time.sleep(0.2)

    def stop_server(self, timeout: float = 20.0) -> None:
        """SIGTERM to Odoo's process group (it shuts down gracefully), SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue

    def stop(self) -> None:
        self.stop_server()

    def __enter__(self) -> LabOdoo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "--- odoo log tail ---\n" + "\n".join(self.log_text().splitlines()[-lines:])

    # -- internals ------------------------------------------------------------------------

    def _write_config(self, role_password: str) -> None:
        assert self.tree is not None
        data_dir = self.base / "data"
        data_dir.mkdir(exist_ok=True)
        options = {
            "addons_path": ",".join(str(path) for path in addons_paths(self.tree)),
            "data_dir": str(data_dir),
            "db_host": LOOPBACK, "db_port": str(self.postgres.port),
            "db_user": ODOO_ROLE, "db_password": role_password, "db_maxconn": "8",
            "admin_passwd": secrets.token_urlsafe(12),
            "http_interface": LOOPBACK, "http_port": str(self.port), "gevent_port": str(free_port()),
            "list_db": "False", "max_cron_threads": "0", "workers": "0", "log_level": "info",
        }
        # 17.0 and 18.0 install demo data unless told; 19.0 installs none and reads a boolean.
        if self.source.major < 19:
            options["without_demo"] = "all"
        self.config_path.write_text("[options]\n" + "".join(f"{k} = {v}\n" for k, v in options.items()))
        self.config_path.chmod(0o600)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/web/health", timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False
