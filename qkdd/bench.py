"""``qkdd bench``: the benchmarks we and our users quote.

``cascade`` rows: for each variant, QBER and frame size, frames with exactly round(n·QBER) errors at
uniformly random positions are reconciled with both roles in one process (no network). Efficiency is
f = disclosed bits / (n · h(QBER)); frame error rate is the fraction of frames with residual errors
after Cascade (before confirmation); throughput is sifted bits per second of wall time, after
:func:`qkdd.stages.cascade.warm_up`.

``amplification`` rows: Toeplitz hashing of n input bits to n/2 output bits, for n = 2^20 and 2^24 (the
largest input a round may have), with ``--quick`` too.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from qkdd.stages import amplify, cascade
from qkdd.stages.keylength import binary_entropy

FULL_QBERS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08)
FULL_SIZES = (1 << 14, 1 << 16, 1 << 18, 1 << 20)
FULL_FRAMES = {1 << 14: 1000, 1 << 16: 100, 1 << 18: 20, 1 << 20: 5}
QUICK_QBERS = (0.01, 0.02, 0.05)
QUICK_SIZES = (1 << 14, 1 << 16)
QUICK_FRAMES = {1 << 14: 20, 1 << 16: 5}
AMPLIFICATION_SIZES = (1 << 20, 1 << 24)


@dataclass(frozen=True)
class CascadeRow:
    variant: str
    qber: float
    frame_bits: int
    frames: int
    efficiency_mean: float
    efficiency_p95: float
    frame_error_rate: float
    round_trips: float
    throughput_bps: float


@dataclass(frozen=True)
class AmplificationRow:
    input_bits: int
    output_bits: int
    throughput_bps: float
    fft_backend: str


def bench_cascade(variant: str, qber: float, n: int, frames: int, seed: int = 1) -> CascadeRow:
    cascade.warm_up()  # rows measure steady throughput, not numba's import and kernel loading
    rng = np.random.default_rng([seed, n, round(qber * 1e6)])
    errors = round(n * qber)
    ideal = n * binary_entropy(errors / n)
    efficiencies: list[float] = []
    failures = 0
    round_trips = 0
    elapsed = 0.0
    for _ in range(frames):
        alice = rng.integers(0, 2, n, dtype=np.uint8)
        bob = alice.copy()
        bob[rng.choice(n, errors, replace=False)] ^= 1
        started = time.perf_counter()
        result, _ = cascade.reconcile_in_memory(alice, bob, qber, rng, variant=variant)
        elapsed += time.perf_counter() - started
        efficiencies.append(result.disclosed_bits / ideal)
        failures += not np.array_equal(result.key, alice)
        round_trips += result.round_trips
    return CascadeRow(
        variant,
        qber,
        n,
        frames,
        float(np.mean(efficiencies)),
        float(np.percentile(efficiencies, 95)),
        failures / frames,
        round_trips / frames,
        n * frames / elapsed,
    )


def bench_amplification(n: int, repeats: int = 3, seed: int = 2) -> AmplificationRow:
    rng = np.random.default_rng(seed)
    m = n // 2
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed_bits = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    amplify.toeplitz_hash(key, seed_bits, m)  # warm-up: FFT plans
    started = time.perf_counter()
    for _ in range(repeats):
        amplify.toeplitz_hash(key, seed_bits, m)
    seconds = (time.perf_counter() - started) / repeats
    return AmplificationRow(n, m, n / seconds, amplify.fft_backend_name())


def run(
    *,
    quick: bool,
    variants: Sequence[str],
    qbers: Sequence[float] | None = None,
    sizes: Sequence[int] | None = None,
    frames: int | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    qbers = qbers or (QUICK_QBERS if quick else FULL_QBERS)
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    per_size = QUICK_FRAMES if quick else FULL_FRAMES
    rows = []
    for variant in variants:
        for n in sizes:
            for qber in qbers:
                row = bench_cascade(variant, qber, n, frames or per_size.get(n, 5))
                rows.append(row)
                if progress:
                    progress(row)
    amplification = [bench_amplification(n, repeats=1 if n > 1 << 22 else 3) for n in AMPLIFICATION_SIZES]
    return {
        "cascade": [asdict(r) for r in rows],
        "amplification": [asdict(r) for r in amplification],
        "auth": bench_auth(quick),
    }


def bench_auth(quick: bool) -> dict[str, Any]:
    """Wegman–Carter MAC throughput, and reserve bits a round consumes against its secret key (§16-§17).

    The secret key per round comes from one frame of the default ``sim`` link (2^24 pulses, 10 km)
    through every stage; a reserve-authenticated round consumes a fixed number of one-time-pad bits.
    """
    from qkdd import engine, policy  # noqa: PLC0415
    from qkdd.auth import wegman_carter as wc  # noqa: PLC0415
    from qkdd.links.sim import SimParameters  # noqa: PLC0415

    size = 1 << (22 if quick else 24)
    message = np.random.default_rng(4).bytes(size)
    mac = wc.Mac([12345, 67890])
    mac.tag(message[:1000], [1, 2])
    seconds = math.inf
    for _ in range(3):  # a round's transcript, as the engine hashes it; the best of three
        started = time.perf_counter()
        transcript = wc.Transcript(mac)
        transcript.append(message)
        transcript.tag([1, 2])
        seconds = min(seconds, time.perf_counter() - started)
    (round_,) = _engine_rounds(SimParameters(), 1)
    secret_bits = round_.secret_bits
    consumed = engine.ROUND_RESERVE_BITS
    return {
        "mac_throughput_bps": 8 * size / seconds,
        "mac_message_bytes": size,
        "forgery_bound_per_tag": wc.forgery_bound(wc.MAX_TRANSCRIPT_BYTES),
        "consumed_bits_per_round": consumed,
        "handshake_bits": 0,  # qkdp/2 handshakes spend no pad (§17)
        "handshake_key_bits": policy.HANDSHAKE_KEY_BITS,  # a new handshake key, at most one per refill
        "secret_bits_per_round": secret_bits,
        "consumed_percent_of_secret": 100 * consumed / secret_bits if secret_bits else None,
    }


def format_cascade_row(row: CascadeRow) -> str:
    return (
        f"{row.variant:<10} {row.qber * 100:>5.1f}% {row.frame_bits:>9} {row.frames:>6} "
        f"{row.efficiency_mean:>8.4f} {row.efficiency_p95:>8.4f} {row.frame_error_rate:>9.2e} "
        f"{row.round_trips:>8.0f} {row.throughput_bps / 1e6:>9.2f}"
    )


CASCADE_HEADER = (
    f"{'variant':<10} {'QBER':>6} {'frame':>9} {'frames':>6} {'f_mean':>8} {'f_p95':>8} {'FER':>9} "
    f"{'RTs':>8} {'Mbit/s':>9}"
)


def format_auth(auth: dict[str, Any]) -> str:
    return (
        f"  MAC {auth['mac_throughput_bps'] / 1e6:.1f} Mbit/s of transcript; a round consumes "
        f"{auth['consumed_bits_per_round']} reserve bits = {auth['consumed_percent_of_secret'] or 0:.3f}% of "
        f"its {auth['secret_bits_per_round']} secret bits; "
        f"forgery bound {auth['forgery_bound_per_tag']:.1e} per tag"
    )


def main_auth(quick: bool, as_json: bool) -> int:
    auth = bench_auth(quick)
    print(json.dumps({"auth": auth}, indent=2) if as_json else format_auth(auth))
    return 0


def main(quick: bool, as_json: bool, variants: Sequence[str], frames: int | None) -> int:
    def progress(row: CascadeRow) -> None:
        if not as_json:
            print(format_cascade_row(row), flush=True)

    if not as_json:
        print("cascade (both roles in one process, exact errors at random positions)")
        print(CASCADE_HEADER)
    report = run(quick=quick, variants=variants, frames=frames, progress=progress)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print("\nauthentication (Wegman-Carter, key reserve)")
    print(format_auth(report["auth"]))
    print("\nprivacy amplification (Toeplitz, n -> n/2)")
    print(f"{'input bits':>12} {'output bits':>12} {'Mbit/s':>9}  backend")
    for amp in report["amplification"]:
        print(
            f"{amp['input_bits']:>12} {amp['output_bits']:>12} {amp['throughput_bps'] / 1e6:>9.2f}  "
            f"{amp['fft_backend']}"
        )
    return 0


def _engine_rounds(parameters: Any, rounds: int) -> list[Any]:
    """Alice's summaries of ``rounds`` rounds of the ``sim`` link with ``parameters``, run by both roles'
    real engines joined in memory (:mod:`qkdd.loopback`): the daemons' round, not a copy of it."""
    from qkdd import engine, loopback  # noqa: PLC0415
    from qkdd.auth.psk import generate_psk  # noqa: PLC0415
    from qkdd.bits import SystemRandom  # noqa: PLC0415
    from qkdd.links.sim import SimAlice, SimBob  # noqa: PLC0415

    settings = engine.EngineSettings(link_id="bench", psk=generate_psk())
    links = SimAlice(parameters), SimBob(parameters)
    return loopback.run_rounds(settings, links, (SystemRandom(), SystemRandom()), rounds)


def bench_keyrate(quick: bool) -> dict[str, Any]:
    """Time to compute one decoy-state bound, and achieved against predicted key per pulse.

    Achieved: rounds of the default ``sim`` link (2^24 pulses) run by both engines joined in memory;
    predicted: ``qkdd keyrate`` for the same parameters and block size.
    """
    from qkdd import keyrate  # noqa: PLC0415
    from qkdd.links.sim import SimParameters  # noqa: PLC0415
    from qkdd.stages import decoy  # noqa: PLC0415

    model = keyrate.LinkModel()
    counts, _, _ = keyrate.expected_counts(model, 10, 10**6)
    repeats = 2000
    started = time.perf_counter()
    for _ in range(repeats):
        decoy.decoy_key_length(counts, eps_sec=model.eps_sec, eps_cor=model.eps_cor)
    bound_seconds = (time.perf_counter() - started) / repeats
    rows = []
    frames = 2 if quick else 5
    for km in (5.0, 15.0):
        parameters = SimParameters(distance_km=km)
        secret = sum(r.secret_bits for r in _engine_rounds(parameters, frames))
        achieved = secret / (frames * parameters.pulses_per_frame)
        block = round(parameters.pulses_per_frame * model.key_detections_per_pulse(km))
        predicted = keyrate.row(model, km, block).key_per_pulse
        rows.append(
            {
                "distance_km": km,
                "frames": frames,
                "achieved_per_pulse": achieved,
                "predicted_per_pulse": predicted,
                "ratio": achieved / predicted if predicted else None,
            }
        )
    return {"bound_seconds": bound_seconds, "rows": rows}


def main_keyrate(quick: bool, as_json: bool) -> int:
    report = bench_keyrate(quick)
    if as_json:
        print(json.dumps({"keyrate": report}, indent=2))
        return 0
    print(f"one decoy-state bound: {report['bound_seconds'] * 1e6:.0f} µs")
    print(f"{'km':>5} {'frames':>6} {'achieved/pulse':>15} {'keyrate/pulse':>14} {'ratio':>6}")
    for row in report["rows"]:
        print(
            f"{row['distance_km']:>5.0f} {row['frames']:>6} {row['achieved_per_pulse']:>15.3e} "
            f"{row['predicted_per_pulse']:>14.3e} {row['ratio'] or 0:>6.3f}"
        )
    return 0
