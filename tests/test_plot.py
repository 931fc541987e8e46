"""``qkdd plot``: a link's history read from its key store, drawn in one figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from qkdd.cli import main
from qkdd.plot import history
from qkdd.records import RoundSummary
from qkdd.store import KeyStore


def _summary(number: int, secret: int, aborted: bool) -> RoundSummary:
    qber = 0.5 if aborted else 0.01
    reason = "phase error rate 0.5000 exceeds threshold 0.1100" if aborted else None
    return RoundSummary(number, number, 1 << 20, 5000, 3000, qber, qber, 300, secret, aborted, reason, "psk")


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """Four rounds: two committed with 4096 reserve bits each, one aborted between them; 1,000 reserve
    bits used after the second committed one, then an aborted round."""
    store = KeyStore(tmp_path, "plot-link")
    try:
        store.store_round(_summary(0, 2048, False), [("key-0", bytes(256))], False, 1.0, (bytes(512), 4096))
        store.record_aborted(_summary(1, 0, True), 1.0)
        store.store_round(_summary(2, 1024, False), [("key-2", bytes(128))], False, 1.0, (bytes(512), 4096))
        store.reserve.consume(128 + 1000)
        store.record_aborted(_summary(3, 0, True), 1.0)
    finally:
        store.close()
    return tmp_path


def test_the_history_holds_each_ended_round_and_the_reserve_after_it(store_dir: Path) -> None:
    found = history(store_dir)
    assert found.link_id == "plot-link" and found.rounds == [0, 1, 2, 3]
    assert found.aborted == [False, True, False, True] and found.secret_bits == [2048, 0, 1024, 0]
    assert found.qber == [0.01, 0.5, 0.01, 0.5]
    # the reserve's first 128 bits are its hash keys; the pads used show from the round after their use
    assert found.reserve_bits == [4096 - 128, 4096 - 128, 8192 - 128, 8192 - 1128]


def test_plot_writes_a_png(store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "history.png"
    assert main(["plot", "--state-dir", str(store_dir), "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and "4 rounds of link plot-link" in capsys.readouterr().out


def test_plot_without_a_store_or_rounds_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plot", "--state-dir", str(tmp_path)]) == 2
    assert "no key store at" in capsys.readouterr().err
    KeyStore(tmp_path, "empty-link").close()
    assert main(["plot", "--state-dir", str(tmp_path)]) == 2
    assert "no round has ended yet" in capsys.readouterr().err
