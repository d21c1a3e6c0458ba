"""The metrics listener of `mailgate serve`: `/metrics` for Prometheus, `/healthz` for probes.

At each scrape the serving process's own values, the milter processes' files (see
`mailgate.infra.metrics`) and the values read at scrape time (the blacklist's size, whether the
milter is up, the configuration's generation) become one exposition: families of the same name
are joined and samples of the same name and labels summed, so a count split between the serving
process and the milter (store errors, refusals) is one series. The HTTP server answers from a
thread of its own; a scrape takes the GIL only for the time it formats the text.
"""

from __future__ import annotations

import glob
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from mailgate.infra.logfmt import kv_line
from mailgate.infra.socketspec import SocketSpec

TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
"""The classic text format, which every Prometheus reads (our names need none of the newer escapes)."""
Live = Callable[[], Iterable[Metric]]
HealthCheck = Callable[[], tuple[bool, str]]


def merged(sources: Iterable[Iterable[Metric]]) -> list[Metric]:
    """Families joined by name, samples of the same name and labels summed (first seen first)."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for source in sources:
        for family in source:
            families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                samples[key] = samples.get(key, 0.0) + sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


class GatewayCollector(Collector):
    """The serving process's registry + the milter processes' files + the live values."""

    def __init__(self, registry: CollectorRegistry, files: Path | None, live: Live) -> None:
        self.registry, self.files, self.live = registry, files, live

    def collect(self) -> Iterator[Metric]:
        sources: list[Iterable[Metric]] = [self.registry.collect(), self.live()]
        if self.files is not None:
            sources.append(MultiProcessCollector.merge(glob.glob(os.path.join(self.files, "*.db"))))
        yield from merged(sources)


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._answer(HTTPStatus.OK, generate_latest(self.server.exposition), TEXT_FORMAT)
        elif path == "/healthz":
            healthy, text = self.server.health()
            self._answer(HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE, f"{text}\n".encode(),
                         "text/plain; charset=utf-8")
        else:
            self._answer(HTTPStatus.NOT_FOUND, b"mailgate: /metrics or /healthz\n", "text/plain; charset=utf-8")

    def _answer(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Scrapes are not decisions: nothing in the log."""


class MetricsServer(ThreadingHTTPServer):
    """HTTP on an `inet:`/`inet6:` spec, served from a daemon thread."""

    daemon_threads = True

    def __init__(self, spec: SocketSpec, collector: Collector, health: HealthCheck) -> None:
        if spec.family == "unix":
            raise ValueError("the metrics listener takes inet: or inet6:, not a unix socket")
        self.address_family = socket.AF_INET6 if spec.family == "inet6" else socket.AF_INET
        self.exposition = CollectorRegistry(auto_describe=False)
        self.exposition.register(collector)
        self.health = health
        super().__init__((spec.host or "", spec.port or 0), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else host
        return f"http://[{host_text}]:{port}" if self.address_family == socket.AF_INET6 else \
            f"http://{host_text}:{port}"

    def start_in_thread(self) -> None:
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="metrics", daemon=True)
        self._thread.start()
        logging.getLogger("mailgate").info(kv_line(None, event="listening", service="metrics", url=self.url))

    def stop_thread(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
            self._thread = None
        self.server_close()
