from __future__ import annotations

import json

import pytest

from qkdd.cli import main


def test_bench_json_has_the_documented_fields(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--json", "--variant", "original", "--frames", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["cascade"][0]
    assert set(row) >= {
        "variant",
        "qber",
        "frame_bits",
        "efficiency_mean",
        "efficiency_p95",
        "frame_error_rate",
        "round_trips",
        "throughput_bps",
    }
    assert {r["frame_bits"] for r in report["cascade"]} == {1 << 14, 1 << 16}
    amp = report["amplification"][0]
    assert set(amp) >= {"input_bits", "output_bits", "throughput_bps"}
    assert amp["input_bits"] == 1 << 20


def test_bench_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--quick", "--variant", "original", "--frames", "1"]) == 0
    out = capsys.readouterr().out
    assert "f_mean" in out and "privacy amplification" in out


def test_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--frames", "0"]) == 2
    assert "--frames" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--variant", "turbo"])
