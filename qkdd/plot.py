"""``qkdd plot --state-dir DIR [--out FILE.png]``: a link's history from its round records, in one figure.

Three panels over the round number: the error rates each round measured (QBER in the key basis, the phase
error bound from the test basis) against the abort threshold; the secret key each round stored (aborted
rounds marked); and the key reserve's unused bits after each round, which authenticate the rounds to come.
It reads the key store without writing to it, so it may run beside the daemon.
"""

from __future__ import annotations

import argparse
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from qkdd.auth.reserve import KEY_REGION_BITS
from qkdd.errors import InputError
from qkdd.stages import estimation


@dataclass(frozen=True)
class History:
    """One entry per ended round (committed or aborted), in round order."""

    link_id: str
    rounds: list[int]
    qber: list[float | None]
    phase_error: list[float | None]
    secret_bits: list[int]  # 0 for an aborted round
    aborted: list[bool]
    reserve_bits: list[int]  # unused reserve bits once the round ended


def history(state_dir: Path) -> History:
    """The history in the key store of ``state_dir`` (read-only)."""
    from qkdd.store import DATABASE, read_only  # noqa: PLC0415

    path = state_dir / DATABASE
    if not path.exists():
        raise InputError(f"no key store at {path}")
    try:
        with read_only(state_dir) as db:
            link = db.execute("SELECT value FROM meta WHERE name = 'link_id'").fetchone()
            rows = db.execute(
                "SELECT round, state, qber, phase_error, secret_bits, finished_at FROM rounds "
                "WHERE state != 'pending' ORDER BY round"
            ).fetchall()
            added = db.execute(
                "SELECT r.finished_at, v.bits FROM reserve v JOIN rounds r ON r.round = v.round "
                "WHERE v.start IS NOT NULL ORDER BY r.finished_at"
            ).fetchall()
            used = db.execute("SELECT at, past FROM reserve_use ORDER BY at").fetchall()
    except sqlite3.Error as error:
        raise InputError(f"{path}: cannot read the key store: {error}") from None
    reserve = []
    for *_, finished_at in rows:
        total = sum(bits for at, bits in added if at <= finished_at)
        consumed = max([KEY_REGION_BITS, *(past for at, past in used if at <= finished_at)])
        reserve.append(max(0, total - consumed))
    return History(
        link_id=str(link[0]) if link else "?",
        rounds=[r[0] for r in rows],
        qber=[r[2] for r in rows],
        phase_error=[r[3] for r in rows],
        secret_bits=[r[4] if r[1] == "committed" else 0 for r in rows],
        aborted=[r[1] == "aborted" for r in rows],
        reserve_bits=reserve,
    )


def draw(found: History, out: Path, threshold: float = estimation.DEFAULT_THRESHOLD) -> None:
    """Write the figure of ``found`` to ``out`` (PNG, or any format matplotlib takes by suffix)."""
    try:
        import matplotlib  # noqa: PLC0415 - optional

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise InputError("qkdd plot needs matplotlib: pip install 'qkdd[keyrate]'") from None
    figure, (errors, key, reserve) = plt.subplots(3, 1, sharex=True, figsize=(8, 7.5))
    x = found.rounds

    def percent(values: list[float | None]) -> list[float]:
        return [float("nan") if v is None else 100 * v for v in values]

    errors.plot(x, percent(found.qber), "C0.-", label="QBER (key basis, after Cascade)")
    errors.plot(x, percent(found.phase_error), "C1.-", label="phase error bound (test basis)")
    errors.axhline(100 * threshold, color="C3", linestyle="--", label=f"abort threshold {100 * threshold:g}%")
    errors.set_ylabel("error rate (%)")
    errors.set_ylim(bottom=0)
    errors.legend(loc="upper right", fontsize="small")
    key.bar(x, [bits / 1e3 for bits in found.secret_bits], color="C2", label="secret key stored")
    failed = [r for r, aborted in zip(x, found.aborted, strict=True) if aborted]
    if failed:
        key.plot(failed, [0] * len(failed), "rx", label="aborted round")
    key.set_ylabel("secret key (kbit)")
    key.legend(loc="lower right", fontsize="small")
    reserve.step(x, [bits / 1e3 for bits in found.reserve_bits], "C4", where="post")
    reserve.set_ylabel("unused reserve (kbit)")
    reserve.set_xlabel("round")
    for axes in (errors, key, reserve):
        axes.grid(True, alpha=0.3)
    figure.suptitle(
        f"link {found.link_id}: {len(x)} rounds, {sum(found.secret_bits) / 1e6:.2f} Mbit of secret key"
    )
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)


def run(args: argparse.Namespace) -> int:
    """``qkdd plot``."""
    found = history(args.state_dir)
    if not found.rounds:
        raise InputError(f"{args.state_dir}: no round has ended yet; nothing to plot")
    out = args.out if args.out is not None else Path(f"qkdd-{found.link_id}.png")
    draw(found, out)
    print(f"wrote {out}: {len(found.rounds)} rounds of link {found.link_id}")
    return 0
