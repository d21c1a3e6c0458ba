"""Every metric `mailgate serve` exports, defined once with its help text (README, "Metrics").

The adapters count at the points where they log a decision; the rules never import this module.
Label values are few and known (roles, verdicts, reply keys, server names), so each label set is
bound once and kept (`_bound`): a message's update is a dict lookup and an increment, never the
library's label validation under its lock.

The milter runs in a process of its own. When `serve` exports metrics it starts that process
with PROMETHEUS_MULTIPROC_DIR naming a directory of its own (made fresh at each start): there
prometheus_client keeps each process's values in a memory-mapped file named by its pid, written
at every increment, so what a milter process counted survives its death (even SIGKILL) and a new
process counts in a file of its own; `mailgate.infra.exposition` adds them to the serving
process's values at each scrape. Nothing is counted twice: each count lives in exactly one file
or in the serving process's memory, and the files are summed once per scrape.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from mailgate.rules.reason_vocabulary import REASONS
from mailgate.rules.replies import SMTP, SmtpReply
from mailgate.store.interface import BounceRecord, bounce_kind

# A `_created` series per counter would not survive the sum over processes; rates need none.
disable_created_metrics()

REGISTRY = CollectorRegistry(auto_describe=True)
"""The serving process's own metrics; the milter process's come from its files."""

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
"""A message's end, a store operation: from a tenth of a millisecond to a busy timeout's seconds."""
FAST_BUCKETS = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0)
"""A lookup or a policy answer: microseconds, unless the store makes it wait."""

DECISIONS = Counter(
    "mailgate_decisions_total",
    "Messages the milter decided, by role (outbound|inbound), verdict (outbound: kept|encapsulated|refused; "
    "inbound: deliver|reject|defer|hold|drop), reason (the outbound rule step, the inbound route kind), "
    "server (outbound) and whether it was mass mail or a dry run.",
    ["role", "verdict", "reason", "server", "mass", "dry_run"], registry=REGISTRY)
REFUSALS = Counter(
    "mailgate_refusals_total",
    "Refusals, by stage (rcpt: the policy service; end_of_message: the milter) and reply key "
    "(mailgate.rules.replies: no_such_alias, forged_bounce, loop_reject, blacklisted, quota_defer, ...); "
    "dry_run=yes: logged, not refused.",
    ["stage", "reply", "dry_run"], registry=REGISTRY)
BOUNCES = Counter(
    "mailgate_bounces_recorded_total",
    "Failed recipients of delivery reports recorded as bounces, by reason and kind (hard|soft|unknown).",
    ["reason", "kind"], registry=REGISTRY)
REPUTATION_ALERTS = Counter(
    "mailgate_reputation_alerts_total",
    "Reputation alerts (docs/rules.md B6): sender-side bounces past the threshold in one window, per upstream "
    "server, recipient domain and reason.",
    ["server", "domain", "reason"], registry=REGISTRY)
STORE_ERRORS = Counter(
    "mailgate_store_errors_total", "Store operations that failed, by operation.", ["operation"], registry=REGISTRY)
STORE_SECONDS = Histogram(
    "mailgate_store_operation_duration_seconds", "Time the store took per operation (failed ones included).",
    ["operation"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
MILTER_RESTARTS = Counter(
    "mailgate_milter_restarts_total", "Milter processes started again after one died.", registry=REGISTRY)
RELOADS = Counter(
    "mailgate_config_reloads_total", "Configuration reloads (SIGHUP), by result (ok|refused).", ["result"],
    registry=REGISTRY)
END_OF_MESSAGE_SECONDS = Histogram(
    "mailgate_milter_end_of_message_seconds", "Time the milter took to answer a message's end, by role.",
    ["role"], buckets=LATENCY_BUCKETS, registry=REGISTRY)


class LoopHistogram(Collector):
    """A latency histogram written by one event loop's thread only (the policy or the lookup
    service), so without a lock: an observation is a bisect and two additions, a fraction of
    the library's locked one, on paths whose whole cost is a few microseconds (bench/micro.py).
    A scrape from another thread may see an observation's bucket before its sum: harmless."""

    def __init__(self, name: str, documentation: str, label: str | None = None,
                 buckets: tuple[float, ...] = FAST_BUCKETS, registry: CollectorRegistry = REGISTRY) -> None:
        self.name, self.documentation, self.label, self.bounds = name, documentation, label, buckets
        self.series: dict[str, Series] = {}
        registry.register(self)

    def child(self, value: str = "") -> Series:
        series = self.series.get(value)
        if series is None:
            series = self.series[value] = Series(self.bounds)
        return series

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.label] if self.label else None)
        for value, series in list(self.series.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), list(series.counts), strict=True):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            family.add_metric([value] if self.label else [], buckets, series.total)
        yield family


class Series:
    """One label value's buckets (not cumulative) and sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


POLICY_SECONDS = LoopHistogram(
    "mailgate_policy_answer_seconds", "Time the policy service took to answer a request (its batch's time).")
LOOKUP_SECONDS = LoopHistogram(
    "mailgate_lookup_duration_seconds", "Time the socketmap service took per lookup, by map "
    "(transport|delivery|sasl|unknown).", label="map")

REPLY_KEYS: dict[SmtpReply, str] = {reply: key for key, reply in SMTP.items()}
"""The reply table's key of each SMTP reply the milter gives."""

_bound: dict[tuple[object, ...], Any] = {}


def bound(metric: MetricWrapperBase, *labels: str) -> Any:
    """`metric.labels(*labels)`, made once per label set and kept (dict lookups are atomic under
    the GIL; two threads binding the same new set at once get the library's same child)."""
    key = (metric, *labels)
    child = _bound.get(key)
    if child is None:
        child = _bound[key] = metric.labels(*labels)
    return child


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def bounce_labels(record: BounceRecord) -> tuple[str, str]:
    """(reason, kind) of a recorded bounce: the only place that reads a bounce for its labels.
    The reason is its class (docs/rules.md B4, a bounded vocabulary: the diagnostic text is
    free and unbounded), the kind hard (the recipient's fault, B5), soft or unknown."""
    reason = record.reason if record.reason in REASONS else "undefined"
    return reason, bounce_kind(record.hard, record.permanent, record.reason)


def reply_key(reply: SmtpReply | None) -> str:
    return REPLY_KEYS.get(reply, "other") if reply is not None else "none"
