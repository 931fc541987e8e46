"""Privacy amplification by Toeplitz hashing (protocol/qkdp-v2.md §7).

Theory of operation: Toeplitz matrices over GF(2) with a uniformly random seed form a 2-universal family
(Krawczyk 1994), so by the leftover hash lemma the output is ε-close to uniform given Eve's information
when the output is short enough (the key-length stage decides how short). Alice draws the seed; both sides
hash their (identical, confirmed) reconciled key.

Convention, pinned by ``protocol/vectors/toeplitz.json``: for an input ``x`` of ``n`` bits, output length
``m`` and seed ``s`` of ``n + m - 1`` bits, the matrix is ``T[i, j] = s[i - j + n - 1]`` and
``y[i] = XOR_j T[i, j] x[j]``. Equivalently ``y[i]`` is bit ``i + n - 1`` of the product ``s * x`` of
the two bit strings as polynomials over GF(2), and of their integer convolution taken mod 2. Two exact
ways compute it, with the same bits:

- Carry-less (:mod:`qkdd.stages.clmul`, used wherever it runs: x86-64 with PCLMULQDQ): the GF(2) middle
  product on 64-bit words by the transposed Karatsuba recursion, with no rounding at all; several times
  faster than the FFT on one core, and it needs no transform of the key ahead of the seed.
- FFT (elsewhere, or with ``QKDD_TOEPLITZ=fft``): one real FFT of each operand, a pointwise product and
  one inverse FFT, of length ``L >= n + m - 1`` (circular wrap-around only touches indices below
  ``n - 1``). Every convolution term is an integer at most ``n``; float64 FFT rounding stays orders of
  magnitude below 0.5 for ``n <= 2**24``, and every call checks that each output lies within
  :data:`ROUNDING_MARGIN` of an integer before reducing it mod 2, so a rounding failure can never
  produce a wrong key silently.
"""

from __future__ import annotations

import bisect
import functools
import operator
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from qkdd import background
from qkdd.bits import Bits, RandomSource, as_bits, pack_bits, random_bits, unpack_bits
from qkdd.errors import InputError, LocalProtocolError, RemoteProtocolError
from qkdd.stages import clmul
from qkdd.stages.fft_lengths import FFTW_LENGTHS

MAX_INPUT_BITS = 1 << 24
"""Largest input either path is specified (and tested) to hash exactly (the FFT's limit: the carry-less
path has none)."""

ROUNDING_MARGIN = 0.25
"""Largest distance of an FFT output from an integer that is accepted before reducing mod 2."""

Spectrum = npt.NDArray[np.complex128]


class _Backend(Protocol):
    name: str

    def length(self, minimum: int) -> int:
        """The transform length for a convolution of ``minimum`` outputs."""

    def spectrum(self, bits: Bits, length: int, threads: int) -> Spectrum:
        """The real FFT of ``bits`` zero-padded to ``length`` (a new array the caller owns)."""

    def convolve(self, s: Bits, x: Bits, length: int, start: int, count: int, threads: int) -> Bits:
        """The circular convolution of length ``length`` of ``s`` and ``x`` at start..start+count, mod 2
        (:func:`_parities`), on up to ``threads`` threads."""

    def convolve_spectrum(
        self, s: Bits, x: Spectrum, length: int, start: int, count: int, threads: int
    ) -> Bits:
        """The same, with ``x`` given as its :meth:`spectrum` at this length."""


def _smooth_length(minimum: int) -> int:
    """The smallest 2^a·3^b·5^c >= minimum: FFT libraries are fastest on such lengths."""
    best = 1 << (minimum - 1).bit_length()
    power5 = 1
    while power5 < best:
        power35 = power5
        while power35 < best:
            candidate = power35
            while candidate < minimum:
                candidate *= 2
            best = min(best, candidate)
            power35 *= 3
        power5 *= 5
    return best


GRID_BITS = 10
"""Transform lengths are 2^s·k with k 5-smooth at most 2^GRID_BITS (:func:`_transform_length`)."""


def _transform_length(minimum: int) -> int:
    """The transform length for a convolution of ``minimum`` outputs: the smallest 5-smooth multiple of
    2^s at or above it, where 2^s is ``minimum``'s magnitude over 2^GRID_BITS.

    A round's length varies by a fraction of a percent from the last one. On the smoothest lengths alone
    nearly every round would need a new FFTW plan (tens of milliseconds for each direction at millions of
    points, even with FFTW_ESTIMATE); on this grid, about 20 lengths per octave (3.5 % apart on average),
    consecutive rounds mostly share one, at the price of transforms about 2 % longer on average.
    """
    shift = max(0, minimum.bit_length() - GRID_BITS)
    return _smooth_length(-(-minimum >> shift)) << shift


def _parities(conv: npt.NDArray[np.float64]) -> Bits:
    """The integers an FFT convolution approximates, mod 2, after checking that each value lies within
    :data:`ROUNDING_MARGIN` of one (``conv`` is overwritten)."""
    rounded = np.rint(conv)
    error = np.subtract(conv, rounded, out=conv)
    if max(np.maximum.reduce(error), -np.minimum.reduce(error)) > ROUNDING_MARGIN:
        raise LocalProtocolError("Toeplitz FFT rounding error too large; refusing to produce a key")
    integers = rounded.astype(np.int32)  # at most n <= 2^24
    integers &= 1
    return integers.astype(np.uint8)


class _NumpyBackend:
    name = "numpy"

    def length(self, minimum: int) -> int:
        return _transform_length(minimum)

    def spectrum(self, bits: Bits, length: int, threads: int = 1) -> Spectrum:
        return np.fft.rfft(bits.astype(np.float64), length)

    def convolve(self, s: Bits, x: Bits, length: int, start: int, count: int, threads: int = 1) -> Bits:
        return self.convolve_spectrum(s, self.spectrum(x, length), length, start, count)

    def convolve_spectrum(
        self, s: Bits, x: Spectrum, length: int, start: int, count: int, threads: int = 1
    ) -> Bits:
        spectrum = self.spectrum(s, length)
        spectrum *= x
        return _parities(np.fft.irfft(spectrum, length)[start : start + count])


class _FftwWorkspace:
    """Aligned buffers for FFTW, reused by every transform length that fits, and a plan per length
    (FFTW_ESTIMATE: planning takes milliseconds). A round's length varies with its key size, so plans
    come and go, but the buffers stay: their pages are not faulted in afresh each round, which on a
    virtual machine costs more than the transforms."""

    name = "pyfftw"

    def length(self, minimum: int) -> int:
        """The fastest measured length at or above ``minimum`` (:mod:`qkdd.stages.fft_lengths`), else the
        grid's."""
        if FFTW_LENGTHS[0] <= minimum <= FFTW_LENGTHS[-1]:
            return FFTW_LENGTHS[bisect.bisect_left(FFTW_LENGTHS, minimum)]
        return _transform_length(minimum)

    def __init__(self, pyfftw: Any) -> None:
        self._pyfftw = pyfftw
        self._capacity = 0
        self._plans: dict[tuple[int, int], tuple[Any, Any]] = {}
        self.lock = threading.Lock()
        self.planning: threading.Thread | None = None  # the last plan made ahead (:meth:`_plan_ahead`)

    def _plan(self, length: int, threads: int) -> tuple[Any, Any]:
        if length > self._capacity:
            # room for the next rounds' longer keys: a round's transform length is one of a few neighbouring
            # table entries (2.56 or 3.0 million at the demo's frames), and outgrowing the buffers costs
            # their pages again
            capacity = length + length // 4
            self._real = self._pyfftw.empty_aligned(capacity, dtype="float64")
            self._spectrum = self._pyfftw.empty_aligned(capacity // 2 + 1, dtype="complex128")
            self._seed_spectrum = self._pyfftw.empty_aligned(capacity // 2 + 1, dtype="complex128")
            self._result = self._pyfftw.empty_aligned(capacity, dtype="float64")
            self._capacity = capacity
            # the plans move to the new buffers (same shapes and alignment) instead of being made again:
            # planning a length of millions takes tens of milliseconds or more, on the round's critical path
            for (known, _), made in self._plans.items():
                self._move(known, made)
        plan = self._plans.get((length, threads))
        if plan is None:
            plan = self._make_plan(length, threads, (self._real, self._spectrum, self._result))
            self._remember(length, threads, plan)
            self._plan_ahead(length, threads)
        return plan

    def _make_plan(self, length: int, threads: int, buffers: tuple[Any, Any, Any]) -> tuple[Any, Any]:
        """Forward and inverse plans of ``length`` on ``buffers`` (real, spectrum, result). FFTW_ESTIMATE
        plans without touching the buffers' contents."""
        flags = ("FFTW_ESTIMATE", "FFTW_DESTROY_INPUT")
        real, spectrum, result = buffers[0][:length], buffers[1][: length // 2 + 1], buffers[2][:length]
        return (
            self._pyfftw.FFTW(real, spectrum, flags=flags, threads=threads),
            self._pyfftw.FFTW(spectrum, result, direction="FFTW_BACKWARD", flags=flags, threads=threads),
        )

    def _move(self, length: int, plan: tuple[Any, Any]) -> None:
        """Point the plans of ``length`` at the current buffers (same shapes and alignment)."""
        forward, backward = plan
        forward.update_arrays(self._real[:length], self._spectrum[: length // 2 + 1])
        backward.update_arrays(self._spectrum[: length // 2 + 1], self._result[:length])

    def _remember(self, length: int, threads: int, plan: tuple[Any, Any]) -> None:
        if len(self._plans) >= 8:
            self._plans.pop(next(iter(self._plans)))
        self._plans[length, threads] = plan

    def _plan_ahead(self, length: int, threads: int) -> None:
        """Plan the next longer measured length on a background thread (call with the lock held).

        A round's length is the table entry above its key's needs, and a slightly longer key than the
        last rounds' takes the next entry (2.56 -> 3.0 million points at the demo's frames): planning it
        then would cost tens of milliseconds or more on the round's critical path; planned ahead, it costs
        idle time."""
        index = bisect.bisect_right(FFTW_LENGTHS, length)
        if index == len(FFTW_LENGTHS) or FFTW_LENGTHS[index] > self._capacity:
            return
        following = FFTW_LENGTHS[index]
        if (following, threads) in self._plans:
            return
        buffers = (self._real, self._spectrum, self._result)

        def plan() -> None:
            background.name_thread("qkdd-fft-plan")
            background.lower_priority()
            made = self._make_plan(following, threads, buffers)
            with self.lock:
                if (following, threads) in self._plans:
                    return
                if self._real is not buffers[0]:  # the buffers grew meanwhile: move the plans there
                    self._move(following, made)
                self._remember(following, threads, made)

        self.planning = threading.Thread(target=plan, name="qkdd-fft-plan", daemon=True)
        self.planning.start()

    def _transform(self, bits: Bits, length: int, threads: int) -> Spectrum:
        """The spectrum of ``bits`` in the workspace (valid until the next transform; hold the lock)."""
        forward, _ = self._plan(length, threads)
        real = self._real[:length]
        real[: bits.size] = bits
        real[bits.size :] = 0.0
        forward()
        spectrum: Spectrum = self._spectrum[: length // 2 + 1]
        return spectrum

    def spectrum(self, bits: Bits, length: int, threads: int) -> Spectrum:
        with self.lock:
            return self._transform(bits, length, threads).copy()

    def convolve(self, s: Bits, x: Bits, length: int, start: int, count: int, threads: int) -> Bits:
        with self.lock:
            spectrum = self._transform(s, length, threads)  # sizes the buffers first
            seed_spectrum = self._seed_spectrum[: spectrum.size]
            np.copyto(seed_spectrum, spectrum)
            self._transform(x, length, threads)[:] *= seed_spectrum
            return self._inverse(length, start, count, threads)

    def convolve_spectrum(
        self, s: Bits, x: Spectrum, length: int, start: int, count: int, threads: int
    ) -> Bits:
        with self.lock:
            self._transform(s, length, threads)[:] *= x
            return self._inverse(length, start, count, threads)

    def _inverse(self, length: int, start: int, count: int, threads: int) -> Bits:
        """The parities of the workspace spectrum's inverse transform at start..start+count."""
        self._plan(length, threads)[1]()  # __call__ normalises the inverse transform by 1/length
        return _parities(self._result[start : start + count])


def _carry_less() -> bool:
    """Whether :func:`toeplitz_hash` takes the carry-less path (the module docstring)."""
    return os.environ.get("QKDD_TOEPLITZ", "") != "fft" and clmul.available() is not None


@functools.cache
def _backend() -> _Backend:
    """FFTW through pyFFTW when installed (about 4x faster than numpy's FFT), else numpy's pocketfft.

    ``QKDD_FFT=numpy`` forces the numpy path (tests compare both).
    """
    if os.environ.get("QKDD_FFT", "") != "numpy":
        try:
            import pyfftw  # type: ignore[import-untyped]  # noqa: PLC0415
        except ImportError:
            pass
        else:
            return _FftwWorkspace(pyfftw)
    return _NumpyBackend()


def warm_up() -> None:
    """Compile the carry-less kernel or load the FFT backend, whichever :func:`toeplitz_hash` uses, and
    hash once, so that the first round does not pay for it (numba loads the kernel from its disk cache,
    or compiles it in about a second on the first run after an install; pyFFTW's import and thread setup
    take a fraction of one)."""
    toeplitz_hash(np.ones(64, dtype=np.uint8), np.ones(64 + 32 - 1, dtype=np.uint8), 32)


def fft_backend_name() -> str:
    """Which implementation :func:`toeplitz_hash` uses: the carry-less kernel's instruction
    (``"vpclmulqdq"`` or ``"pclmulqdq"``), else the FFT's library (``"pyfftw"`` or ``"numpy"``)."""
    width = clmul.available()
    if _carry_less() and width is not None:
        return width
    return _backend().name


def _threads(threads: int | None) -> int:
    return threads if threads is not None else min(2, os.cpu_count() or 1)


def _output_length(output_bits: int) -> int:
    try:
        return operator.index(output_bits)  # numpy integers too
    except TypeError:
        raise InputError(f"output_bits must be an integer, got {type(output_bits).__name__}") from None


def _checked_key(key: Bits, output_bits: int) -> tuple[Bits, int]:
    """The key as bits and the output length (at most the key's) as an int, or :class:`InputError`."""
    x = as_bits(key, "key")
    m = _output_length(output_bits)
    n = x.size
    if n == 0:
        raise InputError("key: privacy amplification needs at least one input bit")
    if n > MAX_INPUT_BITS:
        raise InputError(f"key: {n} bits exceeds the exact-FFT limit of {MAX_INPUT_BITS}")
    if not 0 <= m <= n:
        raise InputError(f"output_bits must lie in [0, {n}], got {m}")
    return x, m


def _checked_seed(seed: Bits, n: int, m: int) -> Bits:
    s = as_bits(seed, "seed")
    if s.size != n + m - 1:
        raise InputError(f"seed: expected {n + m - 1} bits for n={n}, m={m}, got {s.size}")
    return s


def toeplitz_hash(key: Bits, seed: Bits, output_bits: int, *, threads: int | None = None) -> Bits:
    """Hash ``key`` (n bits) to ``output_bits`` (m) bits with the Toeplitz matrix of ``seed`` (n+m-1 bits).
    The FFT path runs on up to ``threads`` threads (default: up to two, as many as there are cores); the
    carry-less one on one.

    Raises:
        InputError: bad shapes or dtypes, ``m > n``, ``n > MAX_INPUT_BITS``, or an empty key.
    """
    x, m = _checked_key(key, output_bits)
    if m == 0:
        return np.zeros(0, dtype=np.uint8)
    n = x.size
    s = _checked_seed(seed, n, m)
    if _carry_less():
        return clmul.toeplitz_hash(clmul.pack(x), n, s, m)
    backend = _backend()
    return backend.convolve(s, x, backend.length(n + m - 1), n - 1, m, _threads(threads))


@dataclass(frozen=True, eq=False)
class PreparedKey:
    """A key made ready ahead of its seed, for hashing it to at most ``max_output_bits`` bits
    (:func:`prepare_key`). On the carry-less path that is the key packed into words (``key_words``;
    ``length`` is 0). On the FFT path it is the key's transform (``spectrum``, of ``length`` points): the
    convolution is linear, so the transform does not depend on the seed, Bob computes it while the
    confirmation runs, and the seed's arrival leaves two of the three transforms (:func:`hash_prepared`).
    Any transform length of at least n + m − 1 gives the same hash (the module docstring), so the one for
    ``max_output_bits`` serves every shorter output."""

    input_bits: int
    max_output_bits: int
    length: int
    spectrum: Spectrum | None = field(repr=False)
    key_words: clmul.Words | None = field(default=None, repr=False)


def prepare_key(key: Bits, max_output_bits: int, *, threads: int | None = None) -> PreparedKey:
    """Transform ``key`` for :func:`hash_prepared` to at most ``max_output_bits`` (≥ 1) bits.

    Raises:
        InputError: as :func:`toeplitz_hash`, or ``max_output_bits`` < 1.
    """
    x, most = _checked_key(key, max_output_bits)
    if most < 1:
        raise InputError(f"max_output_bits must be at least 1, got {most}")
    if _carry_less():
        return PreparedKey(x.size, most, 0, None, clmul.pack(x))
    backend = _backend()
    length = backend.length(x.size + most - 1)
    return PreparedKey(x.size, most, length, backend.spectrum(x, length, _threads(threads)))


def hash_prepared(prepared: PreparedKey, seed: Bits, output_bits: int, *, threads: int | None = None) -> Bits:
    """The same bits as ``toeplitz_hash(key, seed, output_bits)`` for the key ``prepared`` was made of.

    Raises:
        InputError: ``output_bits`` outside [0, ``prepared.max_output_bits``], or a seed of the wrong size.
    """
    m = _output_length(output_bits)
    if not 0 <= m <= prepared.max_output_bits:
        raise InputError(f"output_bits must lie in [0, {prepared.max_output_bits}] (prepared), got {m}")
    if m == 0:
        return np.zeros(0, dtype=np.uint8)
    n = prepared.input_bits
    s = _checked_seed(seed, n, m)
    if prepared.key_words is not None:
        return clmul.toeplitz_hash(prepared.key_words, n, s, m)
    assert prepared.spectrum is not None
    return _backend().convolve_spectrum(s, prepared.spectrum, prepared.length, n - 1, m, _threads(threads))


def toeplitz_hash_rows(key: Bits, seed: Bits, output_bits: int, rows: npt.NDArray[np.int64]) -> Bits:
    """Reference: output bits ``rows`` of the same hash by the direct GF(2) matrix-vector product.

    Row ``i`` of ``T`` is ``s[i : i + n]`` reversed, so ``y[i]`` is the parity of that window AND ``x``.
    """
    x = as_bits(key, "key")
    s = as_bits(seed, "seed")
    n = x.size
    if s.size != n + output_bits - 1:
        raise InputError("seed has the wrong length")
    reversed_key = x[::-1].astype(np.int64)
    return np.array([int(s[i : i + n] @ reversed_key) & 1 for i in rows], dtype=np.uint8)


@dataclass(frozen=True, slots=True)
class AmplificationSeed:
    """Alice → Bob: the Toeplitz seed and output length for this round (qkdp-v2.md §7)."""

    input_bits: int
    output_bits: int
    seed: bytes  # n + m - 1 bits, packed


def choose_seed(source: RandomSource, input_bits: int, output_bits: int) -> AmplificationSeed:
    """Alice's side: a fresh uniformly random seed for hashing ``input_bits`` to ``output_bits``."""
    if not 0 < output_bits <= input_bits:
        raise InputError(f"output_bits must lie in [1, {input_bits}], got {output_bits}")
    return seed_prefix(random_bits(source, input_bits + output_bits - 1), input_bits, output_bits)


def longest_seed(source: RandomSource, input_bits: int) -> Bits:
    """Alice's side, before the output length is known: 2n − 1 uniformly random bits, the seed for the
    longest output (m = n). The seed for any m ≤ n is its first n + m − 1 bits (:func:`seed_prefix`), and
    hashing to m bits gives the first m bits of hashing to any longer length with the same seed: row i
    of T reads only ``s[i … i + n − 1]``. So Alice may hash before reconciliation ends, with a bound on m."""
    if input_bits < 1:
        raise InputError(f"input_bits must be at least 1, got {input_bits}")
    return random_bits(source, 2 * input_bits - 1)


def seed_prefix(seed: Bits, input_bits: int, output_bits: int) -> AmplificationSeed:
    """The message for output length ``output_bits``: the first n + m − 1 bits of ``seed``."""
    if not 0 < output_bits <= input_bits or seed.size < input_bits + output_bits - 1:
        raise InputError(f"no seed for {input_bits} -> {output_bits} bits in {seed.size} seed bits")
    return AmplificationSeed(input_bits, output_bits, pack_bits(seed[: input_bits + output_bits - 1]))


def amplify(key: Bits, message: AmplificationSeed, prepared: PreparedKey | None = None) -> Bits:
    """Either side: hash the reconciled key with the seed Alice chose; with ``prepared``
    (:func:`prepare_key` of this key), from its transform when the output fits it.

    Raises:
        RemoteProtocolError: the message does not fit this key (length, bounds, padding).
    """
    if message.input_bits != key.size:
        raise RemoteProtocolError(f"amplification seed is for {message.input_bits} bits, key has {key.size}")
    if not 0 < message.output_bits <= message.input_bits:
        raise RemoteProtocolError(f"output length {message.output_bits} out of range")
    seed = unpack_bits(message.seed, message.input_bits + message.output_bits - 1, "amplification seed")
    if (
        prepared is not None
        and prepared.input_bits == key.size
        and message.output_bits <= prepared.max_output_bits
    ):
        return hash_prepared(prepared, seed, message.output_bits)
    return toeplitz_hash(key, seed, message.output_bits)
