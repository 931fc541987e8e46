"""Transform lengths for privacy amplification's FFTs with FFTW (:mod:`qkdd.stages.amplify`).

Any length of at least n + m − 1 gives the same hash; only the speed differs, and under FFTW_ESTIMATE
plans it differs a lot between neighbouring 5-smooth lengths (up to about 1.5 times): a slightly
longer length is often faster than the one the plain grid of :func:`amplify._transform_length` picks.
:data:`FFTW_LENGTHS` are the lengths that no longer one beats: the suffix minima of the median of four
interleaved timings of every 5-smooth multiple of 4 from 10^6 to 8.4·10^6
(`python -m qkdd.stages.fft_lengths`, a few minutes). Outside the table's range the grid applies.

The timings are those of the 2-core test machine (AMD EPYC, pyFFTW 0.15.1 with the FFTW 3 it bundles,
libfftw3.so.3.5.5). The plans FFTW_ESTIMATE makes are derived, not timed, so they are the same wherever
the same FFTW build runs on a CPU with the same vector instructions, and their speeds should rank alike
on similar CPUs. On another CPU, run the module to see whether its table would differ.
A different length never changes a key.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

FFTW_LENGTHS = (
    1000000, 1152000, 1280000, 1310720, 1312200, 1350000, 1399680, 1600000, 1638400, 2000000, 2048000,
    2099520, 2560000, 3000000, 3125000, 4000000, 4096000, 4374000, 5000000, 5120000, 5248800, 5832000,
    6000000, 6400000, 6480000, 6553600, 6750000, 7558272, 8000000, 8192000, 8294400, 8388608, 8398080,
)  # fmt: skip
"""Increasing; each is faster than every longer 5-smooth length up to 8.4·10^6 (module docstring)."""


def smooth_lengths(low: int, high: int) -> list[int]:
    """The multiples of 4 in [low, high] with no prime factor above 5, increasing."""
    found = []
    power2 = 4
    while power2 <= high:
        power23 = power2
        while power23 <= high:
            length = power23
            while length <= high:
                if length >= low:
                    found.append(length)
                length *= 5
            power23 *= 3
        power2 *= 2
    return sorted(found)


def fastest(times: dict[int, float]) -> list[int]:
    """The lengths that no longer length beats, increasing: for any minimum, the first of them at or above
    it is the fastest length at or above it."""
    kept: list[int] = []
    best = float("inf")
    for length in sorted(times, reverse=True):
        if times[length] < best:
            kept.append(length)
            best = times[length]
    return kept[::-1]


def measure(lengths: list[int], repeats: int, pyfftw: Any) -> dict[int, float]:
    """The median over ``repeats`` passes (alternately up and down the list, so that a slow minute is
    spread over all lengths) of the best of two timings of a forward and an inverse real transform."""
    real = pyfftw.empty_aligned(max(lengths), dtype="float64")
    spectrum = pyfftw.empty_aligned(max(lengths) // 2 + 1, dtype="complex128")
    timings: dict[int, list[float]] = {length: [] for length in lengths}
    flags = ("FFTW_ESTIMATE", "FFTW_DESTROY_INPUT")
    for repeat in range(repeats):
        for length in lengths if repeat % 2 == 0 else lengths[::-1]:
            x, y = real[:length], spectrum[: length // 2 + 1]
            forward = pyfftw.FFTW(x, y, flags=flags, threads=1)
            backward = pyfftw.FFTW(y, x, direction="FFTW_BACKWARD", flags=flags, threads=1)
            best = float("inf")
            for _ in range(2):
                x[:] = 1.0
                started = time.perf_counter()
                forward()
                backward()
                best = min(best, time.perf_counter() - started)
            timings[length].append(best)
    return {length: statistics.median(values) for length, values in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qkdd.stages.fft_lengths",
        description="time FFTW's real transforms at every 5-smooth length in a range and print the "
        "lengths that no longer one beats (a new FFTW_LENGTHS)",
    )
    parser.add_argument("--low", type=float, default=1e6, help="shortest length (default 1e6)")
    parser.add_argument("--high", type=float, default=8.4e6, help="longest length (default 8.4e6)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved passes (default 4)")
    args = parser.parse_args(argv)
    try:
        import pyfftw  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError:
        print("pyFFTW is not installed (pip install 'qkdd[fast]')", file=sys.stderr)
        return 1
    lengths = smooth_lengths(int(args.low), int(args.high))
    if not lengths or args.repeats < 1:
        print("no lengths to time (check --low, --high and --repeats)", file=sys.stderr)
        return 2
    times = measure(lengths, args.repeats, pyfftw)
    kept = fastest(times)
    for length in kept:
        print(f"{length:>10} {1e3 * times[length]:8.1f} ms")
    print("FFTW_LENGTHS = (" + ", ".join(map(str, kept)) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
