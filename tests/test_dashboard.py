"""The Grafana dashboard in systemd/: it charts what the daemon exports, in queries Prometheus parses.

The query check uses promtool (Debian package `prometheus`): it skips without it unless
QKDD_REQUIRE_PROMTOOL is set (as .ci/run does).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qkdd.metrics import NAMES

DASHBOARD = Path(__file__).resolve().parent.parent / "systemd" / "grafana-dashboard.json"
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")
# what Grafana puts in for its variables, so that promtool sees plain PromQL
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression in the dashboard: panel targets and variable queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def metric_names(expression: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bqkdd_[a-z0-9_]+\b", expression):
        base = next((name.removesuffix(s) for s in HISTOGRAM_SERIES if name.removesuffix(s) in NAMES), name)
        names.add(base)
    return names


def test_every_metric_a_query_uses_is_one_the_daemon_exports_and_each_is_charted() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used = set().union(*(metric_names(e) for e in expressions(dashboard)))
    assert used, "no query names a qkdd metric"
    assert used <= set(NAMES), sorted(used - set(NAMES))
    assert set(NAMES) <= used, f"exported but not charted: {sorted(set(NAMES) - used)}"


def test_panels_have_unique_ids_a_place_and_the_chosen_data_source() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in panels:
        assert panel["title"] and set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_the_queries_parse(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("QKDD_REQUIRE_PROMTOOL"):
            pytest.fail("promtool (Debian package `prometheus`) is required")
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    rules = []
    for i, text in enumerate(expressions(json.loads(DASHBOARD.read_text()))):
        # a variable's label_values(SELECTOR, LABEL) is Grafana's: its SELECTOR is the PromQL
        expression = re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", text)
        for variable, value in GRAFANA_VARIABLES.items():
            expression = expression.replace(variable, value)
        rules.append({"record": f"qkdd:dashboard_query_{i}", "expr": expression})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    done = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
