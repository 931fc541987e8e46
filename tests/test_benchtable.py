"""The README's benchmark tables (qkdd/benchtable.py): rendered from committed `--json` outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qkdd import benchtable

ROOT = Path(__file__).resolve().parent.parent
E2E = {
    "e2e": [
        {
            "distance_km": 10.0,
            "rtt_ms": 50.0,
            "window": 4,
            "open_rounds": 3,
            "rounds": 8,
            "secret_bps": 1.2e6,
            "steady_secret_bps": 1.5e6,
            "steady_sifted_bps": 4.0e6,
            "first_key_seconds": 1.25,
            "cpu_seconds_per_secret_mbit": 0.9,
            "steady_cpu_seconds_per_secret_mbit": 0.7,
            "peak_rss_mib": 300.4,
            "keys_match": True,
        }
    ]
}


def test_the_readme_tables_are_the_committed_results_rendered() -> None:
    readme = (ROOT / "README.md").read_text()
    expected = benchtable.replace_section(readme, benchtable.load(ROOT / ".ci" / "bench"))
    assert readme == expected, (
        "README's benchmark tables: run python -m qkdd.benchtable .ci/bench --readme README.md"
    )


def test_rows_render_their_figures_and_the_section_is_replaced(tmp_path: Path) -> None:
    tables = benchtable.render(benchtable.merge([E2E, {"e2e": [{**E2E["e2e"][0], "rtt_ms": 0.0}]}]), "note")
    assert tables.startswith("note\n") and tables.count("| 10 | ") == 2
    assert "| 10 | 50 | 4 | 3 | 8 | 1.20 | 1.50 | 4.00 | 1.25 | 0.90 | 0.70 | 300 | yes |" in tables
    pair = {"operation": "pair", "link": "store full", "keys_per_second": 1100.4, "median_ms": 1.5}
    pair |= {"p99_ms": 13.0, "daemon_cpu_ms_per_pair": 1.234, "client_cpu_ms_per_pair": 0.2}
    single = {**pair, "operation": "enc_keys", "daemon_cpu_ms_per_pair": None, "client_cpu_ms_per_pair": None}
    delivery = benchtable.render({"etsi014": [pair, single]}, "note")
    assert "| pair | store full | 1100 | 1.50 | 13.00 | 1.23 | 0.20 |" in delivery
    assert "| enc_keys | store full | 1100 | 1.50 | 13.00 | – | – |" in delivery
    text = f"before\n{benchtable.BEGIN}\nold\n{benchtable.END}\nafter\n"
    replaced = benchtable.replace_section(text, tables)
    assert "old" not in replaced and replaced.startswith("before\n") and replaced.endswith("after\n")
    (tmp_path / "e2e.json").write_text(json.dumps(E2E))
    (tmp_path / "note.txt").write_text("measured here\n")
    readme = tmp_path / "README.md"
    readme.write_text(text)
    assert benchtable.main([str(tmp_path), "--readme", str(readme)]) == 0
    assert "measured here\n" in readme.read_text() and "1.50" in readme.read_text()


def test_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert benchtable.main([str(tmp_path)]) == 2
    assert "no *.json results" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert benchtable.main([str(tmp_path)]) == 2
    assert "benchtable" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text(json.dumps(E2E))
    readme = tmp_path / "README.md"
    readme.write_text("no markers\n")
    assert benchtable.main([str(tmp_path), "--readme", str(readme)]) == 2
    assert "markers" in capsys.readouterr().err
    assert readme.read_text() == "no markers\n"
