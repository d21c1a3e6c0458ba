"""A stand-in for Odoo's XML-RPC API, just enough for `mailgate deliver`.

Odoo cannot run on the test box, so this server answers the two endpoints the mail gateway
uses, `/xmlrpc/2/common` (`authenticate`) and `/xmlrpc/2/object` (`execute_kw` of
`mail.thread.message_process`), the way Odoo does: a wrong password gives `False` from
`authenticate` and `Fault(3, "Access Denied")` from `execute_kw`, a missing database gives
PostgreSQL's own error text, and anything else is a Fault. Tests steer it with `fail_with`
(the Fault text Odoo would send) and `delay` (a slow Odoo), and stop and restart it on the
same port to play an Odoo that goes down and comes back.
"""

from __future__ import annotations

import socketserver
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field
from typing import Any
from xmlrpc.server import MultiPathXMLRPCServer, SimpleXMLRPCDispatcher, SimpleXMLRPCRequestHandler

from mailgate.lab.ports import LOOPBACK

COMMON_PATH = "/xmlrpc/2/common"
OBJECT_PATH = "/xmlrpc/2/object"
STUB_UID = 2

# Odoo's RPC fault codes (odoo/service/wsgi_server.py): everything unexpected is 1, a bad
# login or password is 3.
FAULT_APPLICATION_ERROR = 1
FAULT_ACCESS_DENIED = 3


@dataclass(frozen=True)
class StubCall:
    """One `message_process` call as Odoo received it.

    `model` is None when the caller sent a false value (Odoo then routes the message itself);
    `model_sent` is the value exactly as it came over the wire, and `binary` says whether the
    message came wrapped in `xmlrpc.client.Binary`, as Odoo's own gateway script sends it.
    """

    model: str | None
    message: bytes
    kwargs: dict[str, Any] = field(default_factory=dict)
    model_sent: Any = None
    binary: bool = True


class _RequestHandler(SimpleXMLRPCRequestHandler):
    rpc_paths = (COMMON_PATH, OBJECT_PATH)


class _Server(socketserver.ThreadingMixIn, MultiPathXMLRPCServer):
    """Threaded, so a deliberately slow call does not hold up the next test's requests;
    reusable address, so a restart binds the same port while old connections linger."""

    daemon_threads = True
    allow_reuse_address = True


class OdooStub:
    """A local XML-RPC server that behaves like Odoo's mail gateway API."""

    def __init__(self, database: str = "odoo", login: str = "admin", password: str = "admin",
                 *, host: str = LOOPBACK, port: int = 0) -> None:
        self.database = database
        self.login = login
        self.password = password
        self.host = host
        self.port = port
        self.fail_with: str | None = None
        self.delay: float = 0.0
        self._calls: list[StubCall] = []
        self._next_thread_id = 1
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def calls(self) -> list[StubCall]:
        """A snapshot of every `message_process` call received so far."""
        with self._lock:
            return list(self._calls)

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> OdooStub:
        """Listen (again) on the port of the first start, so "Odoo" comes back where it was."""
        if self._server is not None:
            return self
        server = _Server((self.host, self.port), requestHandler=_RequestHandler,
                         logRequests=False, allow_none=True)
        server.add_dispatcher(COMMON_PATH, self._dispatcher({"authenticate": self._authenticate,
                                                             "version": self._version}))
        server.add_dispatcher(OBJECT_PATH, self._dispatcher({"execute_kw": self._execute_kw}))
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"odoo-stub-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; the port is kept for the next `start()`."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> OdooStub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @staticmethod
    def _dispatcher(functions: dict[str, Any]) -> SimpleXMLRPCDispatcher:
        dispatcher = SimpleXMLRPCDispatcher(allow_none=True)
        for name, function in functions.items():
            dispatcher.register_function(function, name)
        return dispatcher

    def _version(self) -> dict[str, Any]:
        return {"server_version": "stub", "protocol_version": 1}

    def _check_database(self, database: str) -> None:
        if database != self.database:
            raise xmlrpc.client.Fault(
                FAULT_APPLICATION_ERROR,
                f'psycopg2.OperationalError: connection to server failed: FATAL:  database "{database}" '
                "does not exist")

    def _authenticate(self, database: str, login: str, password: str, user_agent_env: Any = None) -> int | bool:
        self._check_database(database)
        return STUB_UID if (login, password) == (self.login, self.password) else False

    def _execute_kw(self, database: str, uid: int, password: str, model: str, method: str,
                    args: list[Any], kwargs: dict[str, Any] | None = None) -> Any:
        if self.delay:
            time.sleep(self.delay)
        self._check_database(database)
        if uid != STUB_UID or password != self.password:
            raise xmlrpc.client.Fault(FAULT_ACCESS_DENIED, "Access Denied")
        if (model, method) != ("mail.thread", "message_process"):
            raise xmlrpc.client.Fault(FAULT_APPLICATION_ERROR,
                                      f"AttributeError: The method '{model}.{method}' does not exist")
        if self.fail_with is not None:
            raise xmlrpc.client.Fault(FAULT_APPLICATION_ERROR, self.fail_with)
        return self._record(args, kwargs or {})

    def _record(self, args: list[Any], kwargs: dict[str, Any]) -> int:
        if len(args) != 2:
            raise xmlrpc.client.Fault(
                FAULT_APPLICATION_ERROR,
                f"TypeError: message_process() takes 2 positional arguments, {len(args)} given")
        model, message = args
        binary = isinstance(message, xmlrpc.client.Binary)
        raw = message.data if binary else str(message).encode("utf-8")
        with self._lock:
            self._calls.append(StubCall(model or None, raw, dict(kwargs), model, binary))
            thread_id = self._next_thread_id
            self._next_thread_id += 1
        return thread_id
