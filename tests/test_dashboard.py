"""dashboards/mailgate.json asks only for metrics that `mailgate serve` exports, and is a
dashboard Grafana can import (every panel with a data source, a position and its queries)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mailgate.commands.servemetrics import ServeMetrics
from mailgate.configfile import parse_config
from mailgate.infra.metrics import REGISTRY
from mailgate.infra.runtime import Runtime
from mailgate.rules.tokens import TokenSigner
from mailgate.store.sqlite import SQLiteStore

DASHBOARD = Path(__file__).resolve().parents[1] / "dashboards" / "mailgate.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported(tmp_path: Path) -> set[str]:
    """The sample names of every family a serve exports: its registry's and those read at a scrape."""
    config = parse_config("alias_domain: mycompany.com\n", check_files=False).config
    runtime = Runtime(config, SQLiteStore(tmp_path / "store.sqlite3"), TokenSigner(b"k" * 32))
    families = [*REGISTRY.collect(), *ServeMetrics(runtime).live()]
    return {family.name + suffix for family in families for suffix in SUFFIXES[family.type]}


def queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel.get("targets", ())]


def test_every_metric_the_dashboard_asks_for_is_exported(tmp_path):
    used = {name for expr in queries() for name in re.findall(r"\bmailgate_[a-z_]+", expr)}
    assert used, "the dashboard has queries"
    assert used <= exported(tmp_path), f"not exported by serve: {sorted(used - exported(tmp_path))}"


def test_the_dashboard_covers_mail_refusals_bounces_and_latency():
    text = " ".join(queries())
    for metric in ("mailgate_decisions_total", "mailgate_refusals_total", "mailgate_bounces_recorded_total",
                   "mailgate_milter_end_of_message_seconds_bucket", "mailgate_policy_answer_seconds_bucket",
                   "mailgate_lookup_duration_seconds_bucket"):
        assert metric in text, metric


def test_every_panel_is_placed_and_has_a_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "mailgate" and dashboard["schemaVersion"] >= 36
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
