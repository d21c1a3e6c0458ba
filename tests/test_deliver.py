"""`mailgate deliver` against a local Odoo stand-in, over real sockets.

What matters to Postfix is only the exit status (0 delivered, 75 deferred, 65 bounced) and the
one line of output, so every test checks those, and the stub's record of what Odoo received.
"""

from __future__ import annotations

import http.server
import io
import shutil
import subprocess
import sys
import textwrap
import threading
import xmlrpc.client
from pathlib import Path

import pytest

from mailgate.config import Config
from mailgate.configfile import parse_config
from mailgate.lab.odoo_stub import OdooStub
from mailgate.lab.ports import LOOPBACK, free_port
from mailgate.odoo import deliver
from mailgate.odoo.deliver import (
    EX_DATAERR,
    EX_OK,
    EX_TEMPFAIL,
    FAULT_RULES,
    DeliveryResult,
    classify_fault,
    deliver_to_odoo,
    main_deliver,
    odoo_model_for,
    read_message,
)

PASSWORD = "Sup3r-S3cret!pw"
MESSAGE = (b"From: Customer <customer@example.org>\r\nTo: sales@mycompany.com\r\n"
           b"Subject: Quote please\r\nMessage-Id: <q1@example.org>\r\n\r\nHello\r\n")
NO_ROUTE = ("Traceback (most recent call last):\n"
            '  File "/odoo/addons/mail/models/mail_thread.py", line 1251, in message_route\n'
            "    raise ValueError(\n"
            "ValueError: No possible route found for incoming message from customer@example.org "
            "to sales@mycompany.com (Message-Id <q1@example.org>:). Create an appropriate mail.alias "
            "or force the destination model.")


def config_yaml(url: str, password_file: Path) -> str:
    return textwrap.dedent(f"""
        alias_domain: mycompany.com
        aliases:
          sales: {{target: "odoo:crm.lead"}}
          support: {{target: "odoo:helpdesk.ticket"}}
          archive: {{target: "mailbox:archive"}}
          inbox: {{target: odoo}}
        fallback_target: "odoo:mail.channel"
        odoo: {{url: "{url}", database: odoo, user: admin, password_file: "{password_file}"}}
        """).lstrip()


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "odoo-password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def stub():
    with OdooStub("odoo", "admin", PASSWORD) as running:
        yield running


def make_config(url: str, password_file: Path) -> Config:
    return parse_config(config_yaml(url, password_file), check_files=False).config


@pytest.fixture
def config(stub: OdooStub, password_file: Path) -> Config:
    return make_config(stub.url, password_file)


def run_main(config: Config, alias: str, data: bytes) -> tuple[int, str]:
    err = io.StringIO()
    code = main_deliver(config, alias, io.BytesIO(data), err)
    return code, err.getvalue()


def test_delivers_with_the_alias_model_and_the_exact_bytes(stub, config):
    result = deliver_to_odoo(config, "sales", MESSAGE)
    assert result == DeliveryResult(EX_OK, "delivered", "delivered", 1)
    [call] = stub.calls
    assert (call.model, call.message, call.kwargs, call.binary) == ("crm.lead", MESSAGE, {}, True)


def test_catchall_lets_odoo_route_the_message_itself(stub, config):
    assert odoo_model_for(config, "catchall") is None
    assert odoo_model_for(config, "bounce") is None
    result = deliver_to_odoo(config, "catchall", MESSAGE)
    assert result.exit_code == EX_OK
    [call] = stub.calls
    assert call.model is None and call.model_sent is False  # False on the wire, like odoo-mailgate.py


def test_bare_odoo_targets_and_the_fallback_route(config):
    assert odoo_model_for(config, "inbox") is None
    assert odoo_model_for(config, "fallback") == "mail.channel"
    assert odoo_model_for(config, "SALES") == "crm.lead"


def test_thread_ids_come_from_odoo(stub, config):
    assert [deliver_to_odoo(config, "support", MESSAGE).thread_id for _ in range(3)] == [1, 2, 3]
    assert {c.model for c in stub.calls} == {"helpdesk.ticket"}


def test_model_lookup_refuses_unknown_aliases_and_mailbox_targets(config):
    with pytest.raises(ValueError, match="unknown alias 'nobody'"):
        odoo_model_for(config, "nobody")
    with pytest.raises(ValueError, match="not to Odoo"):
        odoo_model_for(config, "archive")


@pytest.mark.parametrize("alias", ["nobody", "archive"])
def test_our_configuration_problems_defer(stub, config, alias):
    code, line = run_main(config, alias, MESSAGE)
    assert code == EX_TEMPFAIL and "outcome=tempfail" in line and "configuration" in line
    assert stub.calls == []


def test_missing_password_file_defers(stub, tmp_path):
    config = make_config(stub.url, tmp_path / "absent")
    result = deliver_to_odoo(config, "sales", MESSAGE)
    assert (result.exit_code, result.outcome) == (EX_TEMPFAIL, "tempfail")
    assert "configuration" in result.detail and stub.calls == []


def test_wrong_password_defers_and_nothing_reaches_odoo(stub, config):
    result = deliver_to_odoo(config, "sales", MESSAGE, password="wrong")
    assert result.exit_code == EX_TEMPFAIL and "authentication failed" in result.detail
    assert stub.calls == []


def test_wrong_database_defers(stub, password_file):
    config = make_config(stub.url, password_file)
    stub.database = "production"
    result = deliver_to_odoo(config, "sales", MESSAGE)
    assert result.exit_code == EX_TEMPFAIL and "does not exist" in result.detail


def test_odoo_down_defers_then_delivers_when_it_comes_back(stub, config):
    port = stub.port
    stub.stop()
    result = deliver_to_odoo(config, "sales", MESSAGE, timeout=5)
    assert result.exit_code == EX_TEMPFAIL and "unreachable" in result.detail
    stub.start()
    assert stub.port == port
    assert deliver_to_odoo(config, "sales", MESSAGE, timeout=5).exit_code == EX_OK
    assert len(stub.calls) == 1


def test_nothing_listening_defers(password_file):
    config = make_config(f"http://{LOOPBACK}:{free_port()}", password_file)
    result = deliver_to_odoo(config, "sales", MESSAGE, timeout=5)
    assert result.exit_code == EX_TEMPFAIL and "ConnectionRefusedError" in result.detail


def test_unresolvable_host_defers(password_file):
    config = make_config("http://odoo.invalid:8069", password_file)
    assert deliver_to_odoo(config, "sales", MESSAGE, timeout=5).exit_code == EX_TEMPFAIL


def test_slow_odoo_times_out_and_defers(stub, config):
    stub.delay = 2.0
    result = deliver_to_odoo(config, "sales", MESSAGE, timeout=0.5)
    assert result.exit_code == EX_TEMPFAIL and "timed out" in result.detail


class _BadGateway(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.send_error(502, "Bad Gateway")

    def log_message(self, *args: object) -> None:
        pass


def test_http_5xx_from_a_proxy_defers(password_file):
    server = http.server.HTTPServer((LOOPBACK, 0), _BadGateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        config = make_config(f"http://{LOOPBACK}:{server.server_address[1]}", password_file)
        result = deliver_to_odoo(config, "sales", MESSAGE, timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == EX_TEMPFAIL and "502" in result.detail


@pytest.mark.parametrize("fault_text", [
    "ValueError: No possible route found for incoming message",
    NO_ROUTE,
    "UnicodeDecodeError: 'ascii' codec can't decode byte 0xe9 in position 3",
])
def test_messages_odoo_refuses_bounce(stub, config, fault_text):
    stub.fail_with = fault_text
    code, line = run_main(config, "sales", MESSAGE)
    assert code == EX_DATAERR and "outcome=refused" in line
    assert stub.calls == []


@pytest.mark.parametrize("fault_text", [
    "could not serialize access due to concurrent update",
    "psycopg2.errors.SerializationFailure: could not serialize access due to concurrent update\n\n"
    "During handling of the above exception, another exception occurred:\n\nValueError: retry",
    'psycopg2.OperationalError: FATAL:  database "odoo" does not exist',
    "psycopg2.OperationalError: server closed the connection unexpectedly",
    "KeyError: 'crm.lead'",
    "odoo.exceptions.AccessError: You are not allowed to create 'Lead' records.",
])
def test_transient_and_unknown_faults_defer(stub, config, fault_text):
    stub.fail_with = fault_text
    assert run_main(config, "sales", MESSAGE)[0] == EX_TEMPFAIL


def test_source_lines_in_a_traceback_do_not_steer_the_classification():
    text = ("Traceback (most recent call last):\n"
            "    except OperationalError:  # could not serialize access\n"
            "ValueError: No possible route found for incoming message")
    rule = classify_fault(xmlrpc.client.Fault(1, text))
    assert rule is not None and rule.outcome == "refused"


def test_every_rule_says_why():
    assert all(rule.why and rule.outcome in deliver.EXIT_CODES for rule in FAULT_RULES)


@pytest.mark.parametrize("payload", [
    MESSAGE.replace(b"Hello", b"Caf\xe9 \xff\xfe \x00 na\xefve"),
    b"Subject: big\r\n\r\n" + bytes(range(256)) * (5 * 1024 * 1024 // 256),
], ids=["non-utf8", "5MB"])
def test_arbitrary_bytes_arrive_byte_exact(stub, config, payload):
    code, _ = run_main(config, "sales", payload)
    assert code == EX_OK
    assert stub.calls[0].message == payload


def test_the_log_line_is_one_short_key_value_line(stub, config):
    code, line = run_main(config, "sales", MESSAGE)
    assert code == EX_OK
    assert line == "mailgate deliver: alias=sales model=crm.lead outcome=delivered thread=1\n"


def test_the_password_never_reaches_the_log_line(stub, config):
    lines = [run_main(config, "sales", MESSAGE)[1], run_main(config, "nobody", MESSAGE)[1]]
    stub.fail_with = f"ValueError: bad message for password {PASSWORD}"
    lines.append(run_main(config, "sales", MESSAGE)[1])
    stub.fail_with = f"KeyError: {PASSWORD}\nsecond line"
    lines.append(run_main(config, "sales", MESSAGE)[1])
    stub.stop()
    lines.append(run_main(config, "sales", MESSAGE)[1])
    for line in lines:
        assert PASSWORD not in line and line.count("\n") == 1 and line.startswith("mailgate deliver: ")


class _Exploding(io.RawIOBase):
    def read(self, size: int = -1) -> bytes:
        raise OSError("stdin went away")


class _BrokenStderr(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("stderr closed")


def test_main_deliver_never_raises(stub, config):
    err = io.StringIO()
    assert main_deliver(config, "sales", _Exploding(), err) == EX_TEMPFAIL
    assert "outcome=tempfail" in err.getvalue() and "internal error" in err.getvalue()
    assert main_deliver(config, "sales", io.BytesIO(MESSAGE), _BrokenStderr()) == EX_OK
    assert main_deliver(config, "sales", None, io.StringIO()) == EX_TEMPFAIL  # type: ignore[arg-type]


def test_oversized_messages_defer_without_reaching_odoo(stub, config, monkeypatch):
    monkeypatch.setattr(deliver, "MAX_MESSAGE_BYTES", 1024)
    with pytest.raises(deliver.MessageTooLarge):
        read_message(io.BytesIO(b"x" * 1025), limit=1024)
    code, line = run_main(config, "sales", MESSAGE + b"x" * 2048)
    assert code == EX_TEMPFAIL and "larger than" in line and stub.calls == []


def test_empty_input_is_refused(stub, config):
    assert run_main(config, "sales", b"")[0] == EX_DATAERR and stub.calls == []


def test_only_tempfail_defers_in_postfix_terms():
    """Postfix's sys_exits.c: only 71 and 75 are soft; 78 (EX_CONFIG) would bounce."""
    assert set(deliver.EXIT_CODES.values()) == {0, 65, 75}
    assert EX_TEMPFAIL == 75 and EX_DATAERR == 65


def _mailgate_command() -> list[str]:
    found = shutil.which("mailgate", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "mailgate"]


def _deliver_is_wired() -> bool:
    """argparse exits 2 ("invalid choice") for a subcommand it does not know."""
    shown = subprocess.run([*_mailgate_command(), "--help"], capture_output=True, text=True, timeout=60)
    listed = any(line.split()[:1] == ["deliver"] for line in shown.stdout.splitlines())
    return listed and subprocess.run([*_mailgate_command(), "deliver", "--help"], capture_output=True,
                                     timeout=60).returncode == 0


@pytest.mark.e2e
def test_the_command_line_postfix_runs(stub, password_file, tmp_path):
    if not _deliver_is_wired():
        pytest.skip("`mailgate deliver` is not a subcommand yet")
    path = tmp_path / "mailgate.yaml"
    path.write_text(config_yaml(stub.url, password_file))
    done = subprocess.run([*_mailgate_command(), "deliver", "--alias", "sales", "--config", str(path)],
                          input=MESSAGE, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [c.message for c in stub.calls] == [MESSAGE]
    assert PASSWORD.encode() not in done.stderr + done.stdout
