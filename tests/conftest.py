"""Shared pytest hooks and the lab gateway fixture of the end-to-end modules."""

from __future__ import annotations

import shutil
from typing import Iterator

import pytest

from mailgate.lab.gateway import LabGateway
from mailgate.lab.postfix import make_basedir


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the test item, so fixtures can attach logs on failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="module")
def gw(request) -> Iterator[LabGateway]:
    """One whole gateway (private Postfix, `mailgate serve`, sinks, Odoo stand-in) per module;
    a module may add configuration lines with GATEWAY_EXTRA_CONFIG."""
    base = make_basedir()
    gateway = LabGateway(base, getattr(request.module, "GATEWAY_EXTRA_CONFIG", ""))
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    """One private PostgreSQL (loopback, own data directory) for the whole run; tests create
    their own databases in it."""
    from mailgate.lab.postgres import PrivatePostgres
    base = make_basedir("mgpg")
    server = PrivatePostgres(base)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def attach_logs(request, gw):
    """On failure, show what mailgate and Postfix logged."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print("--- mailgate log ---\n" + gw.mailgate_log()[-6000:])
        if gw.pf:
            print(gw.pf.log_tail(80))
