from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdd.errors import InputError, LocalProtocolError, RemoteProtocolError
from qkdd.stages import amplify, clmul, fft_lengths
from qkdd.stages.amplify import (
    _NumpyBackend,
    _smooth_length,
    _transform_length,
    toeplitz_hash,
    toeplitz_hash_rows,
)
from qkdd.stages.fft_lengths import FFTW_LENGTHS
from tests.conftest import STRESS, hex_bits, load_vectors
from tests.helpers import SeededRandom

CARRY_LESS = clmul.available() is not None


@pytest.fixture(params=["carry-less", "fft"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test on each of toeplitz_hash's paths (QKDD_TOEPLITZ)."""
    if request.param == "fft":
        monkeypatch.setenv("QKDD_TOEPLITZ", "fft")
    elif not CARRY_LESS:
        pytest.skip("the carry-less kernel does not run on this machine")
    elif os.environ.get("QKDD_TOEPLITZ") == "fft":
        monkeypatch.delenv("QKDD_TOEPLITZ")
    return str(request.param)


def fft_hash(key: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    """The FFT path's hash, whichever path toeplitz_hash takes."""
    backend = amplify._backend()
    n = key.size
    return backend.convolve(seed, key, backend.length(n + m - 1), n - 1, m, 1)


def carry_less_hash(key: np.ndarray, seed: np.ndarray, m: int) -> np.ndarray:
    return clmul.toeplitz_hash(clmul.pack(key), key.size, seed, m)


@given(st.integers(1, 300), st.data())
def test_fft_matches_direct_product(n: int, data: st.DataObject) -> None:
    m = data.draw(st.integers(0, n))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed_bits = rng.integers(0, 2, n + m - 1 if m else 0, dtype=np.uint8)
    expected = toeplitz_hash_rows(key, seed_bits, m, np.arange(m)) if m else np.zeros(0, np.uint8)
    assert np.array_equal(toeplitz_hash(key, seed_bits, m), expected)
    if m:
        assert np.array_equal(fft_hash(key, seed_bits, m), expected)


@pytest.mark.skipif(not CARRY_LESS, reason="the carry-less kernel does not run on this machine")
@given(st.integers(1, 2000), st.data())
def test_carry_less_matches_direct_product(n: int, data: st.DataObject) -> None:
    """Every output length's block shape, odd sizes, m = 1 and m = n, against the row-by-row product."""
    m = data.draw(st.sampled_from([1, n, max(1, n // 2)]) | st.integers(1, n))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed_bits = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    expected = toeplitz_hash_rows(key, seed_bits, m, np.arange(m))
    assert np.array_equal(carry_less_hash(key, seed_bits, m), expected)


@pytest.mark.skipif(not CARRY_LESS, reason="the carry-less kernel does not run on this machine")
@pytest.mark.parametrize(
    ("n", "m"),
    [
        (1, 1),
        (64, 64),
        (65, 1),
        (65, 65),
        (8191, 8191),  # one leaf of 128 words
        (8193, 8193),  # the first Karatsuba step
        (20_000, 8193),
        (70_001, 1),  # 137 blocks of one 8-word leaf each
        (70_001, 65_537),
        (300_007, 299_999),
        (300_007, 4_097),
    ],
)
def test_carry_less_matches_fft_and_direct_product_at_block_boundaries(n: int, m: int) -> None:
    rng = np.random.default_rng([n, m])
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    out = carry_less_hash(key, seed, m)
    assert np.array_equal(out, fft_hash(key, seed, m))
    rows = np.unique(np.concatenate([[0, m - 1], rng.integers(0, m, 16)]))
    assert np.array_equal(out[rows], toeplitz_hash_rows(key, seed, m, rows))


def test_carry_less_block_shapes_cover_the_output_closely() -> None:
    for m in [1, 64, 65, 511, 512, 513, 8192, 8193, 65_536, 1 << 23, (1 << 23) + 1, 12_345_678, 1 << 24]:
        leaf, block = clmul._block_shape(m)
        assert leaf % 8 == 0 and 8 <= leaf <= clmul.LEAF_WORDS
        assert block % leaf == 0 and (block // leaf) & (block // leaf - 1) == 0  # leaf times 2^d
        assert m <= 64 * block <= max(512, m + m // 8 + 512)


@pytest.mark.skipif(not CARRY_LESS, reason="the carry-less kernel does not run on this machine")
def test_the_narrow_carry_less_kernel_agrees() -> None:
    """With QKDD_TOEPLITZ=pclmulqdq the kernel takes two words per step instead of eight (machines
    without AVX-512); the instruction is chosen once per process, so another process checks it."""
    check = (
        "import numpy as np\n"
        "from qkdd.stages import amplify, clmul\n"
        "assert clmul.available() == 'pclmulqdq'\n"
        "rng = np.random.default_rng(7)\n"
        "for n, m in ((1, 1), (130, 77), (9000, 8500), (40_000, 17_000)):\n"
        "    x = rng.integers(0, 2, n, dtype=np.uint8)\n"
        "    s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)\n"
        "    expected = amplify.toeplitz_hash_rows(x, s, m, np.arange(m))\n"
        "    assert np.array_equal(amplify.toeplitz_hash(x, s, m), expected), (n, m)\n"
    )
    environment = {**os.environ, "QKDD_TOEPLITZ": "pclmulqdq"}
    subprocess.run([sys.executable, "-c", check], env=environment, check=True, timeout=120)


@pytest.mark.skipif(not CARRY_LESS, reason="the carry-less kernel does not run on this machine")
def test_a_second_process_loads_the_carry_less_kernels_from_the_disk_cache(tmp_path: Path) -> None:
    """A daemon's start must not compile the kernels again (about a second of held GIL before the first
    key): the first process compiles and stores them, the next one only loads them."""
    check = (
        "import numpy as np\n"
        "from qkdd.stages import _clmul_kernels, amplify\n"
        "amplify.warm_up()\n"
        "kernels = (_clmul_kernels.toeplitz_blocks, _clmul_kernels.shift_in)\n"
        "print(sum(sum(k.stats.cache_hits.values()) for k in kernels),"
        " sum(sum(k.stats.cache_misses.values()) for k in kernels))\n"
    )
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", check], env=environment, check=True, timeout=120, capture_output=True
        )
        for _ in range(2)
    ]
    (hits, misses), (hits_after, misses_after) = (map(int, run.stdout.split()) for run in runs)
    assert (hits, misses) == (0, 2)  # compiled, and stored
    assert (hits_after, misses_after) == (2, 0)


def test_matrix_convention_by_hand(path: str) -> None:
    # n = 3, m = 2: T[i, j] = s[i - j + 2]; rows [s2 s1 s0], [s3 s2 s1]
    seed = np.array([1, 0, 0, 1], dtype=np.uint8)
    assert toeplitz_hash(np.array([1, 0, 0], np.uint8), seed, 2).tolist() == [0, 1]  # column 0 = s2, s3
    assert toeplitz_hash(np.array([0, 0, 1], np.uint8), seed, 2).tolist() == [1, 0]  # column 2 = s0, s1


@pytest.mark.parametrize("log_n", [20, 24] if STRESS else [20, 22, 24])
def test_large_inputs_exact_on_sampled_rows(log_n: int) -> None:
    """Both paths, bit for bit, and the direct product on sampled rows."""
    rng = np.random.default_rng(log_n)
    n = 1 << log_n
    m = n // 2 + 3
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    out = fft_hash(key, seed, m)
    if CARRY_LESS:
        assert np.array_equal(carry_less_hash(key, seed, m), out)
    rows = np.concatenate([[0, 1, m - 1], rng.choice(m, 5, replace=False)])
    assert np.array_equal(out[rows], toeplitz_hash_rows(key, seed, m, rows))


def test_all_ones_worst_case_magnitude(path: str) -> None:
    # every convolution term equals n: the largest values the FFT has to round
    n = 1 << 20
    key = np.ones(n, dtype=np.uint8)
    seed = np.ones(2 * n - 1, dtype=np.uint8)
    assert toeplitz_hash(key, seed, n).tolist() == [0] * n  # n even: every parity is 0


def test_backends_agree() -> None:
    """Also as lengths change from round to round: shorter ones reuse the buffers, longer ones grow them,
    and every plan reads the right part of them."""
    rng = np.random.default_rng(5)
    for n, m in ((5000, 1234), (3000, 700), (5100, 1300), (20000, 5000), (5000, 1234)):
        s = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
        x = rng.integers(0, 2, n, dtype=np.uint8)
        length = _transform_length(n + m - 1)
        reference = _NumpyBackend().convolve(s, x, length, n - 1, m)
        assert np.array_equal(amplify._backend().convolve(s, x, length, n - 1, m, 2), reference)
        spectrum = amplify._backend().spectrum(x, length, 2)  # the prepared path, across backends
        assert np.array_equal(_NumpyBackend().convolve_spectrum(s, spectrum, length, n - 1, m), reference)
        assert np.array_equal(
            amplify._backend().convolve_spectrum(s, spectrum, length, n - 1, m, 1), reference
        )


def test_fft_values_off_an_integer_are_refused_not_rounded() -> None:
    assert amplify._parities(np.array([1.0, 2.2, 2.8, 1e6 + 0.1])).tolist() == [1, 0, 1, 0]
    for bad in (2.3, 2.7):
        with pytest.raises(LocalProtocolError, match="rounding error"):
            amplify._parities(np.array([1.0, bad]))


def test_smooth_length() -> None:
    for minimum in [1, 2, 7, 1000, 1572863, 1572864, 1572865]:
        length = _smooth_length(minimum)
        assert length >= minimum
        reduced = length
        for p in (2, 3, 5):
            while reduced % p == 0:
                reduced //= p
        assert reduced == 1


def test_transform_lengths_form_a_coarse_grid() -> None:
    """Nearby rounds share a length (and so an FFTW plan): about 20 lengths per octave, each 5-smooth
    and at most 7 % above what it has to hold."""
    for minimum in [1, 1000, 1024, 1025, 1572865, 2_900_000, (1 << 24) - 1]:
        length = _transform_length(minimum)
        assert minimum <= length <= max(1024, minimum * 1.07)
        assert _smooth_length(length) == length
    octave = {_transform_length(m) for m in range(1 << 21, 1 << 22, 101)}
    assert 15 <= len(octave) <= 21
    assert _transform_length(2_900_000) == _transform_length(2_910_000)


def test_hash_to_fewer_bits_is_a_prefix_of_the_hash_to_more(path: str) -> None:
    """What lets Alice hash before she knows the output length: with the seed of the longest output,
    the message for m bits carries its first n + m - 1 bits and the m-bit hash is the longer one's head."""
    rng = np.random.default_rng(11)
    for n in (1, 97, 5000):
        x = rng.integers(0, 2, n, dtype=np.uint8)
        longest = amplify.longest_seed(SeededRandom(n), n)
        assert longest.size == 2 * n - 1
        full = toeplitz_hash(x, longest, n)
        for m in sorted({1, n // 3 + 1, n}):
            message = amplify.seed_prefix(longest, n, m)
            assert (message.input_bits, message.output_bits) == (n, m)
            assert np.array_equal(amplify.amplify(x, message), full[:m])
    with pytest.raises(InputError):
        amplify.seed_prefix(longest, 5000, 5001)


def test_vectors(path: str) -> None:
    for vector in load_vectors("toeplitz"):
        n, m = vector["input_bits"], vector["output_bits"]
        out = toeplitz_hash(hex_bits(vector["key"], n), hex_bits(vector["seed"], n + m - 1), m)
        assert out.tolist() == hex_bits(vector["output"], m).tolist()


@pytest.mark.parametrize(
    ("n", "m", "seed_len", "message"),
    [(0, 0, 0, "at least one"), (4, 5, 8, "output_bits"), (4, 2, 4, "seed"), (4, -1, 4, "output_bits")],
)
def test_bad_shapes(n: int, m: int, seed_len: int, message: str) -> None:
    with pytest.raises(InputError, match=message):
        toeplitz_hash(np.zeros(n, np.uint8), np.zeros(seed_len, np.uint8), m)


def test_output_length_is_any_integer_and_nothing_else() -> None:
    x = np.ones(64, dtype=np.uint8)
    s = np.ones(64 + 32 - 1, dtype=np.uint8)
    assert np.array_equal(toeplitz_hash(x, s, np.int64(32)), toeplitz_hash(x, s, 32))
    with pytest.raises(InputError, match="must be an integer"):
        toeplitz_hash(x, s, 32.0)  # type: ignore[arg-type]


def test_too_large_input_is_refused() -> None:
    with pytest.raises(InputError, match="exact-FFT limit"):
        toeplitz_hash(np.zeros(amplify.MAX_INPUT_BITS + 1, np.uint8), np.zeros(1, np.uint8), 1)


def test_seed_message_round_trip_and_validation(rng: np.random.Generator) -> None:
    key = rng.integers(0, 2, 1000, dtype=np.uint8)
    message = amplify.choose_seed(rng, 1000, 400)
    assert amplify.amplify(key, message).size == 400
    with pytest.raises(RemoteProtocolError, match="seed is for"):
        amplify.amplify(key[:999], message)
    with pytest.raises(RemoteProtocolError, match="out of range"):
        amplify.amplify(key, amplify.AmplificationSeed(1000, 1001, message.seed))
    with pytest.raises(RemoteProtocolError, match="expected"):
        amplify.amplify(key, amplify.AmplificationSeed(1000, 400, message.seed[:-1]))
    with pytest.raises(InputError):
        amplify.choose_seed(rng, 10, 0)


def test_warm_up_loads_the_backend(path: str) -> None:
    loaded = clmul._kernel if path == "carry-less" else amplify._backend
    loaded.cache_clear()
    amplify.warm_up()
    assert loaded.cache_info().currsize == 1  # the first round finds it loaded (or compiled)
    assert amplify.fft_backend_name() == (
        clmul.available() if path == "carry-less" else amplify._backend().name
    )


@pytest.mark.parametrize("path", ["carry-less", "fft"], indirect=True)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the path is one for all examples
@given(n=st.integers(1, 300), data=st.data())
def test_a_prepared_key_hashes_to_the_same_bits_for_every_output_up_to_its_bound(
    path: str, n: int, data: st.DataObject
) -> None:
    most = data.draw(st.integers(1, n))
    m = data.draw(st.integers(0, most))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1 if m else 0, dtype=np.uint8)
    prepared = amplify.prepare_key(key, most)
    assert (prepared.key_words is not None) == (path == "carry-less")
    assert np.array_equal(amplify.hash_prepared(prepared, seed, m), toeplitz_hash(key, seed, m))


def test_a_prepared_key_of_a_round_sized_frame_matches_the_direct_hash(path: str) -> None:
    # the transform length for the bound is longer than the one for the output: both give the same bits
    rng = np.random.default_rng(11)
    n, most, m = 1_000_000, 400_000, 310_000
    key = rng.integers(0, 2, n, dtype=np.uint8)
    seed = rng.integers(0, 2, n + m - 1, dtype=np.uint8)
    prepared = amplify.prepare_key(key, most)
    if path == "fft":
        assert prepared.length > amplify._backend().length(n + m - 1)
    expected = toeplitz_hash(key, seed, m)
    assert np.array_equal(amplify.hash_prepared(prepared, seed, m), expected)
    rows = rng.choice(m, 64, replace=False)
    assert np.array_equal(expected[rows], toeplitz_hash_rows(key, seed, m, rows))


def test_prepared_keys_refuse_what_does_not_fit_them(rng: np.random.Generator) -> None:
    key = rng.integers(0, 2, 1000, dtype=np.uint8)
    prepared = amplify.prepare_key(key, 300)
    with pytest.raises(InputError, match=r"\[0, 300\] \(prepared\)"):
        amplify.hash_prepared(prepared, np.zeros(1300, np.uint8), 301)
    with pytest.raises(InputError, match="seed: expected 1299"):
        amplify.hash_prepared(prepared, np.zeros(1300, np.uint8), 300)
    with pytest.raises(InputError, match="must be an integer"):
        amplify.hash_prepared(prepared, np.zeros(1300, np.uint8), 300.0)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="at least 1"):
        amplify.prepare_key(key, 0)
    with pytest.raises(InputError, match=r"\[0, 1000\]"):
        amplify.prepare_key(key, 1001)
    assert amplify.hash_prepared(prepared, np.zeros(0, np.uint8), 0).size == 0


def test_amplify_uses_a_prepared_key_only_where_it_fits(path: str, rng: np.random.Generator) -> None:
    key = rng.integers(0, 2, 1000, dtype=np.uint8)
    for most, output in ((400, 400), (400, 350), (300, 400)):  # the last one is hashed directly
        message = amplify.choose_seed(rng, 1000, output)
        direct = amplify.amplify(key, message)
        assert np.array_equal(amplify.amplify(key, message, amplify.prepare_key(key, most)), direct)
    other = amplify.prepare_key(key[:999], 400)  # another key's transform is never used
    message = amplify.choose_seed(rng, 1000, 400)
    assert np.array_equal(amplify.amplify(key, message, other), amplify.amplify(key, message))


def test_fftw_takes_the_fastest_measured_length_and_the_grid_outside_the_table() -> None:
    pyfftw = pytest.importorskip("pyfftw")
    workspace = amplify._FftwWorkspace(pyfftw)
    table = FFTW_LENGTHS
    for minimum in (table[0], table[0] + 1, 2_680_000, 2_830_000, table[-1]):
        chosen = workspace.length(minimum)
        assert chosen >= minimum and chosen in table
        assert all(length < minimum for length in table if length < chosen)  # the first at or above
    assert workspace.length(2_830_000) == 3_000_000  # 58 ms here, against the grid's 2,949,120: 89 ms
    for minimum in (table[0] - 1, 5000, table[-1] + 1):
        assert workspace.length(minimum) == _transform_length(minimum)
    assert _NumpyBackend().length(2_830_000) == _transform_length(2_830_000)


def test_the_table_holds_5_smooth_lengths_that_no_longer_one_beats() -> None:
    assert list(FFTW_LENGTHS) == sorted(set(FFTW_LENGTHS))
    candidates = set(fft_lengths.smooth_lengths(10**6, 8_400_000))
    assert set(FFTW_LENGTHS) <= candidates
    assert fft_lengths.smooth_lengths(1, 100) == [
        4,
        8,
        12,
        16,
        20,
        24,
        32,
        36,
        40,
        48,
        60,
        64,
        72,
        80,
        96,
        100,
    ]
    # the suffix minima: the first kept length at or above any minimum is the fastest one there
    times = {4: 3.0, 8: 1.0, 12: 2.0, 16: 1.5, 20: 0.5, 24: 0.9}
    assert fft_lengths.fastest(times) == [20, 24]
    assert fft_lengths.fastest({4: 1.0, 8: 2.0, 12: 3.0}) == [4, 8, 12]


def test_the_table_tool_times_a_range_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pyfftw")
    assert fft_lengths.main(["--low", "1000", "--high", "3000", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("FFTW_LENGTHS = (") and printed[-1].endswith("3000)")
    assert fft_lengths.main(["--low", "5", "--high", "7"]) == 2
    assert "no lengths" in capsys.readouterr().err


def test_fftw_plans_survive_the_buffers_growing(rng: np.random.Generator) -> None:
    """A longer transform grows the workspace's buffers; the plans made for shorter lengths move to the
    new buffers (planning millions of points takes 50-200 ms) and still hash exactly."""
    pyfftw = pytest.importorskip("pyfftw")
    workspace = amplify._FftwWorkspace(pyfftw)
    key = rng.integers(0, 2, 600, dtype=np.uint8)
    short_seed, long_seed = (rng.integers(0, 2, 600 + m - 1, dtype=np.uint8) for m in (200, 600))
    short_length = workspace.length(799)
    first = workspace.convolve(short_seed, key, short_length, 599, 200, 1)
    plan = workspace._plans[short_length, 1]
    workspace.convolve(long_seed, key, 4 * short_length, 599, 600, 1)  # outgrows the buffers
    assert workspace._plans[short_length, 1] is plan
    again = workspace.convolve(short_seed, key, short_length, 599, 200, 1)
    assert np.array_equal(again, first)
    assert np.array_equal(first, amplify.toeplitz_hash_rows(key, short_seed, 200, np.arange(200)))


def test_fftw_plans_the_next_measured_length_ahead(rng: np.random.Generator) -> None:
    """A transform at a table length plans the next longer one on a background thread, so that a
    round whose key is a little longer does not plan on its critical path; that plan hashes exactly."""
    pyfftw = pytest.importorskip("pyfftw")
    workspace = amplify._FftwWorkspace(pyfftw)
    key = rng.integers(0, 2, 600_000, dtype=np.uint8)
    seed = rng.integers(0, 2, 600_000 + 410_000 - 1, dtype=np.uint8)
    workspace.spectrum(key, FFTW_LENGTHS[0], 1)
    assert workspace.planning is not None
    workspace.planning.join(timeout=60)
    ahead = workspace._plans[FFTW_LENGTHS[1], 1]
    hashed = workspace.convolve(seed, key, FFTW_LENGTHS[1], 599_999, 410_000, 1)
    assert workspace._plans[FFTW_LENGTHS[1], 1] is ahead
    rows = np.array([0, 1, 204_999, 409_999])
    assert np.array_equal(hashed[rows], amplify.toeplitz_hash_rows(key, seed, 410_000, rows))
