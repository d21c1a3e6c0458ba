"""`mailgate stats`: what Postfix did with the mail, per upstream server and per day.

The rows come from `watch-log` (one per delivery attempt). People get two small tables, scripts
`--json`, and monitoring `--prometheus`: the text exposition format a node_exporter textfile
collector or a scrape through a tiny HTTP wrapper reads, so that an alert can watch the bounce
and deferral rates of each upstream server without parsing our tables.
"""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from typing import TextIO

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from mailgate.commands.views import parse_since, table
from mailgate.config import Config
from mailgate.rules.replies import EXIT
from mailgate.store import open_store
from mailgate.store.interface import DeliveryCount, ReputationAlert, Store

STATUSES = ("sent", "deferred", "bounced", "expired")


def _pivot(rows: Sequence[DeliveryCount], key: str) -> list[dict]:
    """One row per `key` value (`server` or `day`) with a column per status, in first-seen order
    (the store sorts)."""
    pivoted: dict[str, dict] = {}
    for row in rows:
        value = getattr(row, key)
        line = pivoted.setdefault(value, {key: value, **{s: 0 for s in STATUSES}, "total": 0})
        line[row.status] = line.get(row.status, 0) + row.count
        line["total"] += row.count
    return list(pivoted.values())


def summary(rows: Sequence[DeliveryCount]) -> dict[str, list[dict]]:
    """`delivery_stats` rows (day, server, status, domain, count) as per-server, per-day and
    per-domain totals (a company's alias domain is the domain its mail leaves with)."""
    return {"per_server": sorted(_pivot(rows, "server"), key=lambda r: r["server"]),
            "per_day": _pivot(rows, "day"),
            "per_domain": sorted(_pivot(rows, "domain"), key=lambda r: r["domain"])}


def render_stats(rows: Sequence[DeliveryCount], alerts: Sequence[ReputationAlert] = ()) -> str:
    """The human view: a table per server, then per day, then per domain when mail left with
    more than one (statuses Postfix never reported show 0), then the reputation alerts of the
    period (docs/rules.md B6)."""
    data = summary(rows)
    out = io.StringIO()
    views = [("per server", "server"), ("per day", "day")]
    if len(data["per_domain"]) > 1:
        views.append(("per domain", "domain"))
    for title, key in views:
        print(f"# {title}", file=out)
        table(data[title.replace(" ", "_")], [key, *STATUSES, "total"], out)
        print(file=out)
    print("# reputation alerts (receivers refusing us)", file=out)
    table(alert_rows(alerts), ["window", "server", "domain", "reason", "bounces"], out)
    print(file=out)
    return out.getvalue()


def alert_rows(alerts: Sequence[ReputationAlert]) -> list[dict]:
    return [{**asdict(alert), "window": datetime.fromtimestamp(alert.window_start, UTC).strftime("%Y-%m-%d %H:%M")}
            for alert in alerts]


class _StoreTotals(Collector):
    """The store's all-time totals as metric families, read when the text is made."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        deliveries = CounterMetricFamily("mailgate_deliveries", "Delivery attempts Postfix logged, per upstream "
                                         "server and status.", labels=["server", "status"])
        for total in self.store.delivery_totals():
            deliveries.add_metric([str(total.server), str(total.status)], total.count)
        yield deliveries
        kinds = {"hard": 0, "soft": 0, "unknown": 0}
        for row in self.store.bounce_kind_totals():
            kinds[row.kind] = row.bounces
        bounces = CounterMetricFamily("mailgate_bounces", "Bounces recorded, by kind (hard: the recipient's fault, "
                                      "docs/rules.md B5).",
                                      labels=["kind"])
        for kind, count in kinds.items():
            bounces.add_metric([kind], count)
        yield bounces
        yield GaugeMetricFamily("mailgate_blacklisted_addresses", "Addresses on the blacklist now.",
                                len(self.store.blacklist_entries()))


def prometheus_text(store: Store) -> str:
    """All-time counters (Prometheus computes rates itself) and the blacklist's current size, in
    the text exposition format (prometheus_client's, as `serve`'s /metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StoreTotals(store))
    return generate_latest(registry).decode()


def main_stats(config: Config, since: str | None, as_json: bool, prometheus: bool, *,
               out: TextIO | None = None, now: float | None = None) -> int:
    """`mailgate stats [--since 7d] [--json] [--prometheus]` (`--since` does not apply to the
    Prometheus counters, which are all-time by definition)."""
    out = out or sys.stdout
    try:
        start = parse_since(since, time.time() if now is None else now)
    except ValueError as exc:
        print(f"mailgate: {exc}", file=sys.stderr)
        return EXIT["usage"]
    store = open_store(config.database, config.database_password_file)
    try:
        if prometheus:
            out.write(prometheus_text(store))
            return EXIT["ok"]
        rows = store.delivery_stats(start)
        alerts = store.reputation_alerts(start)
        if as_json:
            print(json.dumps({"since": start, **summary(rows), "rows": [asdict(row) for row in rows],
                              "reputation": alert_rows(alerts)}, ensure_ascii=False), file=out)
        else:
            out.write(render_stats(rows, alerts))
        return EXIT["ok"]
    finally:
        store.close()
