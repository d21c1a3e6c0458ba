"""Configuration loading: defaults, and one clear `file:line: key: message` per problem."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import pytest

from mailgate.config import Config
from mailgate.configfile import ConfigError, load_config, parse_config


def write(tmp_path: Path, text: str, name: str = "mailgate.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    return [str(p) for p in caught.value.problems]


def secret(tmp_path: Path, name: str = "pw", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text("s3cret\n")
    path.chmod(mode)
    return path


def test_empty_file_gives_every_default(tmp_path):
    loaded = load_config(write(tmp_path, ""))
    config = loaded.config
    assert config.loop.minutes == 120 and config.loop.threshold == 20 and config.loop.action == "reject"
    assert config.quota.daily == 200 and config.bounces.blacklist_after == 5 and config.bounces.window_days == 91
    assert config.default_from == "notifications" and config.alias_domains == ()
    assert config.bounce_aliases == ("bounce",)
    assert config.server_selection == "odoo" and not config.dry_run and config.servers == ()
    assert str(config.listen.milter) == "unix:/run/mailgate/milter.sock"
    assert loaded.warnings == ()


def test_shipped_example_is_valid(tmp_path):
    text = resources.files("mailgate").joinpath("data/mailgate.example.yaml").read_text()
    config = parse_config(text, "example.yaml", check_files=False).config
    assert [s.name for s in config.servers] == ["transactional", "mass"]
    assert config.mass_server.name == "mass" and config.servers[1].security == "tls"
    assert [a.address for a in config.aliases] == ["sales@mycompany.com", "support@mycompany.com"]


def test_typed_and_immutable(tmp_path):
    config = load_config(write(tmp_path, f"""
        alias_domain: MyCompany.com
        servers:
          - {{name: a, host: h.example.net, port: 465, username: u, password_file: {secret(tmp_path)},
              from_filter: "mycompany.com, ceo@other.example"}}
        """)).config
    server = config.servers[0]
    assert isinstance(config, Config) and config.alias_domain == "mycompany.com"
    assert server.security == "tls" and server.port == 465
    assert server.from_filter.domains == ("mycompany.com",) and server.from_filter.addresses == ("ceo@other.example",)
    with pytest.raises(AttributeError):
        config.alias_domain = "x"  # type: ignore[misc]


def test_relative_paths_follow_the_file(tmp_path):
    (tmp_path / "secrets").mkdir()
    secret(tmp_path / "secrets", "t")
    config = load_config(write(tmp_path, """
        database: state/db.sqlite3
        servers: [{name: a, host: h.example.net, username: u, password_file: secrets/t}]
        """)).config
    assert config.servers[0].password_file == tmp_path / "secrets" / "t"
    assert config.database == str(tmp_path / "state" / "db.sqlite3")


def test_unknown_key_did_you_mean(tmp_path):
    found = problems(tmp_path, """
        alias_domain: mycompany.com
        defualt_from: notifications
        loop: {minutes: 10, treshold: 3}
        """)
    path = tmp_path / "mailgate.yaml"
    assert f"{path}:2: defualt_from: unknown key; did you mean 'default_from'?" in found
    assert f"{path}:3: loop.treshold: unknown key; did you mean 'threshold'?" in found


@pytest.mark.parametrize("text, line, key, words", [
    ("loop: {minutes: ten}", 1, "loop.minutes", "expected a whole number, got 'ten'"),
    ("dry_run: maybe", 1, "dry_run", "expected true or false"),
    ("server_selection: random", 1, "server_selection", "expected one of odoo, documented"),
    ("alias_domain: not_a_domain", 1, "alias_domain", "expected a domain name"),
    ("default_from: 'bad address@'", 1, "default_from", "expected"),
    ("loop:\n  allowed_senders: [ok@example.com, nope]", 2, "loop.allowed_senders", "expected an email address"),
    ("servers:\n  - name: a\n    host: h\n    port: 70000", 4, "servers[0](a).port",
     "expected a number from 1 to 65535, got 70000"),
    ("servers:\n  - name: a\n    host: h\n    from_filter: 'x.com, bad@'", 4, "servers[0](a).from_filter", "is not"),
    ("servers:\n  - host: h", 2, "servers[0].name", "missing"),
    ("servers: {name: a}", 1, "servers", "expected a list"),
    ("listen: {milter: 'tcp:12'}", 1, "listen.milter", ""),
    ("database: mysql://u@h/db", 1, "database", "SQLite file or a postgresql:// URL"),
    ("mass_mail: {server: mas}\nservers: [{name: mass, host: h}]", 1, "mass_mail.server",
     "no server named 'mas'; did you mean 'mass'?"),
    ("aliases:\n  sales: {domain: mycompany.com}", 2, "aliases.sales.target", "missing"),
    ("alias_domain: a.com\nalias_domain: b.com", 2, "alias_domain", "given twice"),
    ("loop: [1, 2]", 1, "loop", "expected a mapping"),
    ("key: [unclosed", 1, "(yaml)", ""),
])
def test_errors_name_file_line_and_key(tmp_path, text, line, key, words):
    found = problems(tmp_path, text)
    path = tmp_path / "mailgate.yaml"
    matching = [p for p in found if p.startswith(f"{path}:{line}: {key}:")]
    assert matching, found
    assert words in matching[0]


def test_every_problem_reported_at_once(tmp_path):
    found = problems(tmp_path, """
        dry_run: 3
        loop: {minutes: x}
        quota: {daily: -1}
        """)
    assert len(found) == 3


def test_duplicate_server_names(tmp_path):
    found = problems(tmp_path, """
        servers:
          - {name: relay, host: a.example.net}
          - {name: relay, host: b.example.net}
        """)
    assert any(":3: servers[1](relay).name: duplicate server name (also at line 2)" in p for p in found)


def test_password_file_missing_and_world_readable(tmp_path):
    open_secret = secret(tmp_path, "open", 0o644)
    found = problems(tmp_path, f"""
        servers:
          - name: a
            host: h.example.net
            username: u
            password_file: {tmp_path}/missing
          - name: b
            host: h.example.net
            username: u
            password_file: {open_secret}
        """)
    assert any(":5: servers[0](a).password_file: no such file" in p for p in found)
    assert any(":9: servers[1](b).password_file:" in p and "readable by everybody" in p for p in found)


def test_world_readable_bounce_secret_is_refused(tmp_path):
    path = secret(tmp_path, "secret", 0o644)
    assert any("secret_file:" in p and "readable by everybody" in p
               for p in problems(tmp_path, f"secret_file: {path}"))


def test_warnings_do_not_refuse(tmp_path):
    loaded = load_config(write(tmp_path, """
        servers:
          - {name: a, host: h.example.net, port: 587, security: tls}
          - {name: b, host: h.example.net, port: 465, security: starttls}
          - {name: c, host: h.example.net, port: 25}
        """))
    text = "\n".join(str(w) for w in loaded.warnings)
    assert ":2: warning: servers[0](a).security: 'tls' (TLS on connect) on port 587" in text
    assert ":3: warning: servers[1](b).security: 'starttls' on port 465" in text
    assert "port 25 is blocked by many hosting providers" in text


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailgate", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


@pytest.mark.e2e
def test_check_config_cli(tmp_path):
    good = write(tmp_path, "alias_domain: mycompany.com\nsecret_file: secret\n", "good.yaml")
    two = write(tmp_path, "alias_domains: [mycompany.com, {name: brand.example, catchall_alias: contact}]\n"
                "aliases:\n  sales: {target: odoo, domain: brand.example}\n  jobs: odoo\nsecret_file: secret\n",
                "two.yaml")
    bad = write(tmp_path, "alias_domain: mycompany.com\nloop: {treshold: 3}\n", "bad.yaml")
    ok = run_cli("check-config", "--config", str(good))
    assert ok.returncode == 0, ok.stderr
    failed = run_cli("check-config", "--config", str(bad))
    assert failed.returncode != 0
    assert f"{bad}:2: loop.treshold: unknown key; did you mean 'threshold'?" in failed.stderr
    assert "Traceback" not in failed.stderr
    via_env = run_cli("check-config", env={"MAILGATE_CONFIG": str(bad)})
    assert via_env.returncode != 0 and "treshold" in via_env.stderr
    before_name = run_cli("--config", str(good), "check-config")
    assert before_name.returncode == 0
    shown = run_cli("check-config", "--config", str(two))
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.splitlines()[1:] == [
        "  alias domain mycompany.com: bounce bounce@mycompany.com, catchall catchall@mycompany.com, "
        "default sender notifications@mycompany.com; aliases: jobs",
        "  alias domain brand.example: bounce bounce@brand.example, catchall contact@brand.example, "
        "default sender notifications@brand.example; aliases: sales"]


@pytest.mark.e2e
def test_missing_config_file_is_a_clear_error(tmp_path):
    result = run_cli("check-config", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 78 and result.stderr == f"{tmp_path}/nope.yaml: no such file: {tmp_path}/nope.yaml\n"


@pytest.mark.e2e
def test_serve_refuses_a_bad_config(tmp_path):
    bad = write(tmp_path, "servers: [{name: A B, host: h}]\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode != 0 and "servers[0]" in result.stderr and "Traceback" not in result.stderr


# Issue 15, item 6: what `serve` needs at start, `check-config` checks; both refuse with one line, 78.

def serving_config(tmp_path: Path, text: str) -> Path:
    """A config whose sockets and store are in `tmp_path`, so a `serve` that got past the checks
    would not touch the machine's own."""
    sockets = f"""
        listen: {{milter: "unix:{tmp_path}/milter.sock", lookup: "unix:{tmp_path}/lookup.sock",
                  policy: "unix:{tmp_path}/policy.sock"}}
        database: {tmp_path}/state.sqlite3
        """
    return write(tmp_path, textwrap.dedent(sockets) + textwrap.dedent(text).lstrip("\n"))


def refused_by_check_config_and_serve(path: Path, expected: str) -> None:
    for command in ("check-config", "serve"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 78, (command, result.stderr)
        assert result.stderr.count("\n") == 1 and expected in result.stderr, (command, result.stderr)
        assert not list(path.parent.glob("*.sock")), command


@pytest.mark.e2e
def test_a_password_file_that_is_a_directory_is_refused(tmp_path):
    directory = tmp_path / "pw"
    directory.mkdir(mode=0o750)
    directory.chmod(0o750)
    path = serving_config(tmp_path, f"""
        secret_file: secret
        servers: [{{name: a, host: h.example.net, username: u, password_file: {directory}}}]
        """)
    refused_by_check_config_and_serve(path, f":5: servers[0](a).password_file: {directory} is a directory, "
                                            "not a regular file")


@pytest.mark.e2e
def test_a_secret_file_whose_directory_does_not_exist_is_refused(tmp_path):
    path = serving_config(tmp_path, f"secret_file: {tmp_path}/missing/secret\n")
    refused_by_check_config_and_serve(path, f":4: secret_file: {tmp_path}/missing/secret does not exist and "
                                            f"cannot be made: no directory {tmp_path}/missing")


@pytest.mark.e2e
def test_a_secret_shorter_than_the_minimum_is_refused(tmp_path):
    (tmp_path / "secret").write_text("short\n")
    (tmp_path / "secret").chmod(0o600)
    path = serving_config(tmp_path, "secret_file: secret\n")
    refused_by_check_config_and_serve(path, ":4: secret_file: ")
    assert "holds 5 bytes, fewer than 16" in run_cli("check-config", "--config", str(path)).stderr


@pytest.mark.e2e
@pytest.mark.skipif(Path("/etc/mailgate").is_dir(), reason="the default secret's directory exists here")
def test_an_empty_config_whose_default_secret_cannot_be_made_is_refused(tmp_path):
    empty = write(tmp_path, "")
    result = run_cli("check-config", "--config", str(empty))
    assert result.returncode == 78
    assert result.stderr == (f"{empty}: secret_file: /etc/mailgate/secret does not exist and cannot be made: "
                             "no directory /etc/mailgate\n")
    refused_by_check_config_and_serve(serving_config(tmp_path, ""), ": secret_file: /etc/mailgate/secret")


@pytest.mark.e2e
def test_a_secret_made_at_start_passes_check_config(tmp_path):
    """A missing key in a directory it can be made in is fine: serve makes it."""
    path = serving_config(tmp_path, "secret_file: secret\n")
    result = run_cli("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "secret").exists(), "check-config creates nothing"


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_password_file_that_never_ends_is_refused(tmp_path, special):
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo", 0o600)
        special = str(tmp_path / "fifo")
    key = secret(tmp_path, "secret")
    key.write_text("k" * 32)
    found = problems(tmp_path, f"""
        secret_file: {key}
        servers: [{{name: a, host: h.example.net, username: u, password_file: {special}}}]
        """)
    assert found == [f"{tmp_path}/mailgate.yaml:2: servers[0](a).password_file: {special} is a "
                     f"{'character device' if special == '/dev/zero' else 'named pipe'}, not a regular file"]


def test_the_metrics_listener_is_off_by_default_tcp_only_and_on_in_the_example(tmp_path):
    assert load_config(write(tmp_path, "")).config.listen.metrics is None
    spec = load_config(write(tmp_path, "listen: {metrics: 'inet:9187@127.0.0.1'}\n")).config.listen.metrics
    assert spec is not None and (spec.family, spec.host, spec.port) == ("inet", "127.0.0.1", 9187)
    [problem] = problems(tmp_path, "listen: {metrics: 'unix:/run/mailgate/metrics.sock'}\n")
    assert ":1: listen.metrics: expected inet:PORT@HOST" in problem
    example = parse_config(resources.files("mailgate").joinpath("data/mailgate.example.yaml").read_text(),
                           check_files=False).config
    assert str(example.listen.metrics) == "inet:9187@127.0.0.1"


@pytest.mark.parametrize("text, count, warned", [
    ("bounces: {}\n", "recipient", False),
    ("bounces: {count: permanent}\n", "permanent", False),
    ("bounces: {count: all}\n", "all", False),
    ("bounces: {count_soft: true}\n", "all", True),            # files from before `count` still load
    ("bounces: {count_soft: false}\n", "recipient", True),
    ("bounces: {count_soft: true, count: all}\n", "all", True),
])
def test_bounce_count_and_the_older_count_soft(tmp_path, text, count, warned):
    """docs/rules.md B3: `count_soft: true` is `count: all`, `false` the default `recipient`."""
    loaded = load_config(write(tmp_path, text))
    assert loaded.config.bounces.count == count
    assert any("bounces.count_soft: replaced by bounces.count" in str(w) for w in loaded.warnings) is warned


def test_count_soft_contradicting_count_is_an_error(tmp_path):
    found = problems(tmp_path, "bounces:\n  count_soft: true\n  count: recipient\n")
    assert any(":2: bounces.count_soft: says count: all, but count: recipient is set too" in p for p in found), found
    assert any("bounces.count: expected one of" in p or "recipient, permanent, all" in p
               for p in problems(tmp_path, "bounces: {count: hard}\n"))


def test_reputation_settings(tmp_path):
    bounces = load_config(write(tmp_path, "bounces: {reputation_threshold: null, reputation_window_minutes: 15}\n"))
    assert (bounces.config.bounces.reputation_threshold, bounces.config.bounces.reputation_window_minutes) == (None, 15)
    assert load_config(write(tmp_path, "")).config.bounces.reputation_threshold == 10


# -- a key written with no value keeps its default (issue 12, item 5) ------------------------------

@pytest.mark.parametrize("line, attribute, default", [
    ("bounce_alias:", "bounce_alias", "bounce"),
    ("catchall_alias:", "catchall_alias", "catchall"),
    ("default_from:", "default_from", "notifications"),
    ("server_selection:", "server_selection", "odoo"),
    ("catchall_direct_write:", "catchall_direct_write", Config().catchall_direct_write),
    ("loop: {threshold: , minutes: }", "loop", Config().loop),
    ("quota: {daily: }", "quota", Config().quota),
    ("bounces:", "bounces", Config().bounces),
])
def test_a_key_with_no_value_means_its_default(line, attribute, default):
    config = parse_config(f"alias_domain: mycompany.com\n{line}\n", "<test>", check_files=False).config
    holder = config.alias_domains[0] if attribute in ("bounce_alias", "catchall_alias", "default_from") else config
    assert getattr(holder, attribute) == default


def test_null_written_out_still_means_none():
    config = parse_config("alias_domain: mycompany.com\ndefault_from: null\nquota: {daily: ~}\n", "<test>",
                          check_files=False).config
    assert config.alias_domains[0].default_from is None and config.quota.daily is None


# -- names Odoo stores though DNS would refuse them load with a warning (issue 12, item 5) ------------

def test_underscored_names_load_with_a_warning_on_their_line(tmp_path):
    path = tmp_path / "mailgate.yaml"
    path.write_text(textwrap.dedent("""\
        alias_domain: my_company.com
        servers:
          - {name: a, host: smtp.example.com, from_filter: "My_Company.com, odoo@sales_team.example"}
        aliases:
          support: {target: "odoo:helpdesk.ticket", domain: help_desk.example}
        """))
    loaded = load_config(path)
    config = loaded.config
    assert config.alias_domain == "my_company.com"
    assert set(config.servers[0].from_filter.domains) == {"my_company.com"}
    assert config.servers[0].from_filter.addresses == ("odoo@sales_team.example",)
    assert [a.domain for a in config.aliases] == ["help_desk.example"]
    lines = sorted((w.line, w.key) for w in loaded.warnings if "not a DNS name" in w.message)
    assert lines == [(1, "alias_domain"), (3, "servers[0](a).from_filter"), (5, "aliases.support.domain")]


@pytest.mark.parametrize("value", ["my company.com", "-a_b.example", "my_company", "a@b_c"])
def test_what_is_wrong_for_more_than_its_underscores_is_still_an_error(value):
    with pytest.raises(ConfigError):
        parse_config(f"servers:\n  - {{name: a, host: h.example.com, from_filter: '{value}'}}\n", "<test>",
                     check_files=False)
