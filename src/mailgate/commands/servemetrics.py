"""What `mailgate serve` shows on `listen.metrics`: the metrics, the values read at each scrape,
and the health answer.

The milter process's counts reach the scrape through prometheus_client's multiprocess files
(`mailgate.infra.metrics` says why there is no double counting): `files` is a directory made
fresh for this `serve` and removed when it stops, handed to each milter process it starts. A
milter process that dies is marked dead there (its counters stay: they were counted), and the
restart shows in `mailgate_milter_restarts_total`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import mark_process_dead

from mailgate.infra.exposition import GatewayCollector, MetricsServer
from mailgate.infra.health import StoreProbe, health_answer
from mailgate.infra.metrics import MILTER_RESTARTS, REGISTRY, RELOADS
from mailgate.infra.runtime import Runtime
from mailgate.milter.worker import MilterProcess

STORE_SLOW_AFTER = 2.0


class ServeMetrics:
    """The serving process's side: counts what only it sees, answers scrapes and health checks."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.milter: MilterProcess | None = None
        self.generation = 1
        self.loaded_at = time.time()
        self.last_reload_ok = True
        self.reloads_ok, self.reloads_refused = RELOADS.labels("ok"), RELOADS.labels("refused")
        spec = runtime.config.listen.metrics
        self.files = Path(tempfile.mkdtemp(prefix="mailgate-metrics.")) if spec is not None else None
        self.probe = StoreProbe(runtime, slow_after=STORE_SLOW_AFTER)
        self.server = MetricsServer(spec, GatewayCollector(REGISTRY, self.files, self.live), self.health) \
            if spec is not None else None

    def start(self) -> None:
        if self.server is not None:
            self.probe.start()
            self.server.start_in_thread()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop_thread()
            self.probe.stop()
        if self.files is not None:
            shutil.rmtree(self.files, ignore_errors=True)

    def reloaded(self, ok: bool) -> None:
        """A SIGHUP's outcome: a new generation when the file took, the old one kept otherwise."""
        self.last_reload_ok = ok
        if ok:
            self.reloads_ok.inc()
            self.generation += 1
            self.loaded_at = time.time()
        else:
            self.reloads_refused.inc()

    def milter_died(self, pid: int | None) -> None:
        if self.files is not None and pid is not None:
            mark_process_dead(pid, str(self.files))

    def milter_restarted(self) -> None:
        MILTER_RESTARTS.inc()

    def milter_up(self) -> bool:
        return self.milter is not None and self.milter.alive()

    def health(self) -> tuple[bool, str]:
        return health_answer(self.milter_up(), self.probe.state(), self.runtime.config is not None,
                             STORE_SLOW_AFTER)

    def live(self) -> Iterator[Metric]:
        """The values read at each scrape, not counted as they happen."""
        yield GaugeMetricFamily("mailgate_milter_up", "1 while the milter process runs.", int(self.milter_up()))
        yield GaugeMetricFamily("mailgate_config_generation", "Configurations loaded by this serve: 1 at start, "
                                "one more per reload that took.", self.generation)
        yield GaugeMetricFamily("mailgate_config_loaded_timestamp_seconds", "When the running configuration "
                                "was loaded (unix time).", self.loaded_at)
        yield GaugeMetricFamily("mailgate_config_last_reload_ok", "0 after a reload that was refused (the "
                                "running configuration stayed), 1 otherwise.", int(self.last_reload_ok))
        try:
            size = len(self.runtime.store.blacklist_entries())
        except Exception:  # counted in mailgate_store_errors_total; the scrape goes on without it
            return
        yield GaugeMetricFamily("mailgate_blacklisted_addresses", "Addresses on the blacklist now.", size)
