"""Hostile configuration files (issue 15, item 7): each is refused with one `file:line: key:
message` line (or `file: message`), exit 78, quickly and without a traceback; the limits are
the ones README.md's "Limits" states."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mailgate.configfile import ConfigError, load_config, parse_config
from mailgate.configfile.limits import (
    MAX_ALIASES,
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    MAX_NUMBER_CHARS,
    MAX_PROBLEMS,
    MAX_SERVERS,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def refusal(path: Path) -> list[str]:
    """The problems `load_config` reports for the file, within a few seconds."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(path, check_files=False)
    assert time.monotonic() - started < 10, "the refusal took too long"
    return [str(p) for p in caught.value.problems]


def check_config(path: Path | str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailgate", "check-config", "--config", str(path)],
                          capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailgate.yaml"
    path.write_text(text)
    return path


@pytest.mark.e2e
def test_a_5000_digit_integer_is_one_line(tmp_path):
    digits = "9" * 5000
    path = write(tmp_path, f"secret_file: secret\nservers:\n  - {{name: a, host: h.example.net, port: {digits}}}\n")
    assert refusal(path) == [f"{path}:3: (yaml): a number of 5000 characters: at most {MAX_NUMBER_CHARS} "
                             "(quote it if it is text)"]
    result = check_config(path)
    assert result.returncode == 78 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_a_long_number_that_is_text_can_be_quoted(tmp_path):
    path = write(tmp_path, f"servers:\n  - {{name: a, host: h.example.net, username: '{'1' * 40}'}}\n")
    assert load_config(path, check_files=False).config.servers[0].username == "1" * 40


@pytest.mark.parametrize("text, line", [
    ("loop: &a {minutes: *a}\n", 1),
    ("aliases: &a\n  <<: *a\n", 2),
    ("servers: &s\n  - *s\n", 2),
])
@pytest.mark.e2e
def test_a_recursive_anchor_is_one_line(tmp_path, text, line):
    path = write(tmp_path, text)
    found = refusal(path)
    assert len(found) == 1 and found[0].startswith(f"{path}:{line}: (yaml): the anchor &")
    assert "is used inside itself (a recursive anchor)" in found[0]
    result = check_config(path)
    assert result.returncode == 78 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.e2e
def test_50000_levels_of_nesting_are_one_line(tmp_path):
    path = write(tmp_path, "servers: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert refusal(path) == [f"{path}:1: (yaml): nested more than {MAX_DEPTH} levels deep"]
    result = check_config(path)
    assert result.returncode == 78 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_anchors_that_expand_exponentially_are_refused(tmp_path):
    """The "billion laughs": ten lists of ten aliases of the one before, used as a key."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]" for n in range(1, 10)]
    path = write(tmp_path, "\n".join(lines) + "\n? *l9\n: boom\n")
    found = refusal(path)
    assert len(found) == 1 and "(yaml): more than 500000 keys and values" in found[0]


@pytest.mark.e2e
@pytest.mark.parametrize("special", ["/dev/zero", "fifo", "directory"])
def test_a_config_that_is_not_a_regular_file_is_one_line(tmp_path, special):
    if special == "fifo":
        os.mkfifo(tmp_path / "fifo")
        path = tmp_path / "fifo"
        kind = "a named pipe"
    elif special == "directory":
        path, kind = tmp_path, "a directory"
    else:
        path, kind = Path(special), "a character device"
    assert refusal(path) == [f"{path}: {path} is {kind}, not a regular file"]
    result = check_config(path)
    assert result.returncode == 78 and result.stderr == f"{path}: {path} is {kind}, not a regular file\n"


@pytest.mark.e2e
def test_a_file_past_the_size_bound_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "mailgate.yaml"
    with path.open("w") as handle:
        handle.write("aliases:\n")
        handle.writelines(f"  a{n}: target{n}\n" for n in range(4_000_000))  # ~70 MB
    started = time.monotonic()
    result = check_config(path)
    assert time.monotonic() - started < 10
    assert result.returncode == 78
    assert result.stderr == f"{path}: {path} is too big: {path.stat().st_size} bytes, at most {MAX_CONFIG_BYTES}\n"
    with pytest.raises(ConfigError, match="too big"):
        parse_config("#" * (MAX_CONFIG_BYTES + 1), check_files=False)


def test_more_aliases_than_the_bound_are_one_line(tmp_path):
    count = MAX_ALIASES + 1
    path = write(tmp_path, "alias_domain: mycompany.com\naliases:\n"
                 + "".join(f"  a{n}: t\n" for n in range(count)))
    assert refusal(path) == [f"{path}:3: aliases: {count} aliases: at most {MAX_ALIASES}"]
    just_enough = write(tmp_path, "alias_domain: mycompany.com\naliases:\n"
                        + "".join(f"  a{n}: t\n" for n in range(MAX_ALIASES)))
    assert len(load_config(just_enough, check_files=False).config.aliases) == MAX_ALIASES


def test_more_servers_than_the_bound_are_one_line(tmp_path):
    count = MAX_SERVERS + 1
    path = write(tmp_path, "servers:\n" + "".join(f"  - {{name: s{n}, host: h.example.net}}\n" for n in range(count)))
    assert refusal(path) == [f"{path}:2: servers: {count} servers: at most {MAX_SERVERS}"]


def test_a_flood_of_problems_stops_at_the_bound(tmp_path):
    path = write(tmp_path, "".join(f"unknown_{n}: 1\n" for n in range(20_000)))
    found = refusal(path)
    assert len(found) == MAX_PROBLEMS + 1
    assert found[-1] == f"{path}: more than {MAX_PROBLEMS} problems: stopped"


@pytest.mark.parametrize("text, expected", [
    ("2020-13-45: x\n", ":1: (yaml): cannot read this value: month must be in 1..12"),
    ("loop: {[a]: 1}\n", ":1: loop: found unhashable key"),
    ("alias_domain: !!binary 'not base64!'\n", ":1: alias_domain: failed to decode base64 data"),
    ("dry_run: !!python/object:os.system x\n", ":1: dry_run: could not determine a constructor"),
])
@pytest.mark.e2e
def test_a_value_yaml_cannot_build_names_its_line(tmp_path, text, expected):
    path = write(tmp_path, text)
    found = refusal(path)
    assert any(p.startswith(str(path)) and expected in p for p in found), found
    result = check_config(path)
    assert result.returncode == 78 and "Traceback" not in result.stderr


def test_the_readme_states_the_limits():
    text = README.read_text()
    section = text[text.index("### Limits"):]
    for stated in ("1 MiB", f"{MAX_DEPTH} levels", f"{MAX_NUMBER_CHARS} characters", f"{MAX_SERVERS} servers",
                   f"{MAX_ALIASES:,} aliases", "500,000", f"{MAX_PROBLEMS} problems"):
        assert stated in section, stated
