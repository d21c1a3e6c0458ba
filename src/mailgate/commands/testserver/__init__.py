"""`mailgate test-server NAME`: Odoo's "Test Connection" for one upstream server.

An operator who cannot send mail needs to know *which* step breaks and what to change, not a
stack trace, so the test walks the same steps Postfix's smtp client will take (resolve, connect,
TLS, greeting, EHLO, STARTTLS, AUTH, optionally a real message) and records each one as a
`Step`. The first failing step ends the test and carries a likely fix from one table (`FIXES`),
so the wording of advice lives in one place. Network trouble never raises: it is the answer.
"""

from mailgate.commands.testserver.entry import test_server
from mailgate.commands.testserver.result import (
    FIXES,
    SECURITY_LABELS,
    ServerTestResult,
    Step,
    render,
    result_json,
)

__all__ = ["FIXES", "SECURITY_LABELS", "ServerTestResult", "Step", "render", "result_json",
           "test_server"]
