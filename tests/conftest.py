"""Shared pytest hooks and the lab gateway fixture of the end-to-end modules."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import thoroughness
from mailgate.lab import odoo as lab_odoo
from mailgate.lab.gateway import LabGateway
from mailgate.lab.postfix import PrivatePostfix, make_basedir
from mailgate.lab.postgres import PrivatePostgres

# Fixtures that start real daemons (Postfix, `mailgate serve`, PostgreSQL, OpenDKIM): a test that
# uses one belongs to the e2e set, which `pytest -m "not e2e"` leaves out. Here: gw, postgres and
# postgres_server; module-local: gateways (test_postfix_examples), chain (test_dkim_chain), pg
# (test_import_odoo), pair (test_e2e_two_gateways), lab (test_lab, test_policyd_postfix); a real
# Odoo: odoo, odoo_mass (here), odoo_gw (test_e2e_odoo), mass_gw (test_e2e_odoo_mass).
E2E_FIXTURES = frozenset({"gw", "postgres", "postgres_server", "gateways", "chain", "pg", "pair", "lab",
                          "odoo", "odoo_mass", "odoo_gw", "mass_gw"})


def pytest_configure(config):
    """A run that leaves the e2e set out is the fast set: its property tests draw fewer examples."""
    thoroughness.fast = "not e2e" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config, items):
    """Fail the run when a test uses a daemon fixture but is not marked e2e: a new end-to-end test
    must not land silently in the fast set (mark it `@pytest.mark.e2e` or the module
    `pytestmark = pytest.mark.e2e`)."""
    unmarked = [f"{item.nodeid} (uses {', '.join(sorted(E2E_FIXTURES & set(item.fixturenames)))})"
                for item in items
                if E2E_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("e2e") is None]
    if unmarked:
        raise pytest.UsageError("tests that start real daemons must be marked e2e:\n  " + "\n  ".join(unmarked))


# The same rule at run time, for daemons a test starts itself or through a fixture collection
# cannot name: the lab's start methods refuse to run for a test that is not marked e2e, and so
# does starting any program (the mailgate command, postconf, a second interpreter): the fast set
# is the pure and in-process tests. Checked from a test's setup to the start of its teardown,
# since a session fixture of the e2e set may be torn down after the last (fast) test.
_running_e2e = False
_guarding_programs = False


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _running_e2e, _guarding_programs
    _running_e2e = item.get_closest_marker("e2e") is not None
    _guarding_programs = not _running_e2e


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_teardown(item):
    global _guarding_programs
    _guarding_programs = False


_start_program = subprocess.Popen.__init__


@functools.wraps(_start_program)
def _programs_only_in_e2e(self, args, *rest, **kwargs):
    if _guarding_programs:
        program = args if isinstance(args, str | bytes) else next(iter(args), "?")
        pytest.fail(f"runs {program} in a test that is not marked e2e", pytrace=False)
    _start_program(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _programs_only_in_e2e  # type: ignore[method-assign]


def _e2e_only(cls) -> None:
    start = cls.start

    @functools.wraps(start)
    def guarded(self, *args, **kwargs):
        if not _running_e2e:
            pytest.fail(f"{cls.__name__}.start() in a test that is not marked e2e", pytrace=False)
        return start(self, *args, **kwargs)
    cls.start = guarded


for _daemon in (LabGateway, PrivatePostfix, PrivatePostgres, lab_odoo.LabOdoo):
    _e2e_only(_daemon)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the test item, so fixtures can attach logs on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="module")
def gw(request) -> Iterator[LabGateway]:
    """One whole gateway (private Postfix, `mailgate serve`, sinks, Odoo stand-in) per module;
    a module may add configuration lines with GATEWAY_EXTRA_CONFIG, and more LabGateway options
    with `gateway_options(request, base)`."""
    base = make_basedir()
    options = getattr(request.module, "gateway_options", lambda request, base: {})(request, base)
    yield from running(LabGateway(base, getattr(request.module, "GATEWAY_EXTRA_CONFIG", ""), **options), base)


def running(server, base: Path) -> Iterator:
    """A lab server started for the tests, then stopped and its directory removed, whatever the
    tests did (the shape of every daemon fixture here)."""
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """One private PostgreSQL (loopback, own data directory) for the whole run; tests create
    their own databases in it. Tests ask for `postgres`, which checks the e2e marker."""
    base = make_basedir("mgpg")
    yield from running(PrivatePostgres(base), base)


@pytest.fixture
def postgres(request, postgres_server):
    """The run's private PostgreSQL, for e2e tests only. A check at run time as well as at
    collection: a fixture parametrised over backends may ask for it with request.getfixturevalue,
    which collection cannot see (mark such a parameter `pytest.param("postgresql", marks=pytest.mark.e2e)`)."""
    if request.node.get_closest_marker("e2e") is None:
        pytest.fail(f"{request.node.nodeid} starts the private PostgreSQL but is not marked e2e", pytrace=False)
    return postgres_server


@pytest.fixture
def attach_logs(request, gw):
    """On failure, show what mailgate and Postfix logged."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print("--- mailgate log ---\n" + gw.mailgate_log()[-6000:])
        if gw.pf:
            print(gw.pf.log_tail(80))


# -- a real Odoo ------------------------------------------------------------------------------
# The series come from the kits (or MAILGATE_ODOO_SRC) found at collection. A test that asks for
# `odoo` runs on the full-scenario series (MAILGATE_ODOO_FULL_SERIES, default 18.0, or the newest
# found); one marked `@pytest.mark.odoo(every_version=True)` runs on every series found.
# `MAILGATE_ODOO_FULL_SERIES=all` runs everything on every series.
REQUIRE_ODOO = os.environ.get("MAILGATE_REQUIRE_ODOO") == "1"
ODOO_SOURCES = lab_odoo.discover()
NO_ODOO = "none"


def _full_series() -> list[str]:
    wanted = os.environ.get("MAILGATE_ODOO_FULL_SERIES", "18.0")
    if wanted == "all":
        return list(ODOO_SOURCES)
    if wanted in ODOO_SOURCES:
        return [wanted]
    return list(ODOO_SOURCES)[-1:]


def pytest_generate_tests(metafunc):
    if "odoo_series" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("odoo")
    every = marker is not None and marker.kwargs.get("every_version", False)
    series = (list(ODOO_SOURCES) if every else _full_series()) or [NO_ODOO]
    metafunc.parametrize("odoo_series", series, scope="session")


@functools.cache
def _odoo_unavailable() -> str | None:
    return lab_odoo.unavailable_reason()


def _lab_odoo(request, series: str, module: str) -> Iterator[lab_odoo.LabOdoo]:
    reason = _odoo_unavailable()
    if reason is None and module not in ODOO_SOURCES[series].modules:
        reason = f"the Odoo {series} found ({ODOO_SOURCES[series].label()}) cannot install {module}"
    if reason is not None:
        if REQUIRE_ODOO:
            pytest.fail(f"MAILGATE_REQUIRE_ODOO=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    base = make_basedir("mgodoo")
    yield from running(lab_odoo.LabOdoo(base, ODOO_SOURCES[series], request.getfixturevalue("postgres_server"),
                                        module=module), base)


@pytest.fixture(scope="session")
def odoo(request, odoo_series) -> Iterator[lab_odoo.LabOdoo]:
    """A real Odoo of `odoo_series` with `mail` installed in a database of its own, on the run's
    private PostgreSQL; skipped when no Odoo can run here, a failure with MAILGATE_REQUIRE_ODOO=1."""
    yield from _lab_odoo(request, odoo_series, lab_odoo.MAIL)


@pytest.fixture(scope="session")
def odoo_mass(request, odoo_series) -> Iterator[lab_odoo.LabOdoo]:
    """The same with `mass_mailing` (the mass_mailing kit), another server and database."""
    yield from _lab_odoo(request, odoo_series, lab_odoo.MASS_MAILING)
