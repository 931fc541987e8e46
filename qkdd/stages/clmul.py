"""Toeplitz hashing as a carry-less middle product, compiled with numba (the fast path of
:mod:`qkdd.stages.amplify`).

Theory of operation: with the key ``x`` (n bits) and seed ``s`` (n + m − 1 bits) read as polynomials over
GF(2), ``X = Σ x[j] z^j`` and ``S = Σ s[k] z^k``, output bit ``y[i]`` of the Toeplitz hash is the
coefficient of ``z^(i + n − 1)`` in ``S·X``: the *middle product* of ``S`` and ``X`` (Hanrot, Quercia and
Zimmermann 2004, "The middle product algorithm I", definition 1). Bits sit 64 to a little-endian word (bit
``k`` of word ``w`` is bit ``64·w + k``), so one x86 PCLMULQDQ multiplies 64 coefficients by 64.

Square blocks: ``MP(w, v)`` with ``v`` of N words and ``w`` of 2N words is the N words of bits
``64·N − 1 … 128·N − 2`` of ``w·v``. With ``v = v0 + z^(64h) v1`` (h = N/2) and the windows
``A = w[0:2h]``, ``B = w[h:3h]``, ``C = w[2h:4h]`` (HQZ 2004, §3, the transposed Karatsuba formula):

    low half  = MP(B, v0 + v1) + MP(A + B, v1)
    high half = MP(B, v0 + v1) + MP(C + B, v0)

so three half-size products replace four; below ``q`` words the block is multiplied word by word (the
schoolbook products accumulate 128-bit, then shift once). A rectangular hash is a sum of square blocks
(:func:`toeplitz_hash`). Every step is exact arithmetic on bits: nothing is rounded, and no size limit
applies beyond memory.

The word products use the 512-bit VPCLMULQDQ (four per instruction) where the CPU has AVX-512 and
VPCLMULQDQ, else the 128-bit PCLMULQDQ; :func:`available` says which, or that neither can run (another
architecture, or numba pinned to a generic CPU), in which case amplify keeps its FFT path.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Any

import numpy as np
import numpy.typing as npt

from qkdd.bits import Bits

Words = npt.NDArray[np.uint64]

LEAF_WORDS = 128
"""Blocks of at most this many words (a multiple of 8) are multiplied word by word: below it the
Karatsuba step's additions cost more than the product it saves (64-word leaves are about as fast; 32 and
16 are much slower)."""


def _wide_features(features: str) -> bool:
    return all(f"+{name}" in features.split(",") for name in ("avx512f", "vpclmulqdq"))


@functools.cache
def available() -> str | None:
    """``"vpclmulqdq"`` or ``"pclmulqdq"``: the instruction the kernel will use here, or ``None`` when
    it cannot run (no numba, not x86-64, no PCLMULQDQ in numba's target). ``QKDD_TOEPLITZ=pclmulqdq``
    forces the narrow one (the tests compare both).

    The check reads numba's target features instead of trying: LLVM aborts the process on an instruction
    its target lacks, it does not raise."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        import numba  # noqa: PLC0415
        from llvmlite import binding  # type: ignore[import-untyped]  # noqa: PLC0415
    except ImportError:
        return None
    name: str | None = getattr(numba.config, "CPU_NAME", None)
    features: str = getattr(numba.config, "CPU_FEATURES", None) or ""
    if name in (None, "host") and not features:
        features = binding.get_host_cpu_features().flatten()
    if "+pclmul" not in features.split(","):
        return None
    if _wide_features(features) and os.environ.get("QKDD_TOEPLITZ", "") != "pclmulqdq":
        return "vpclmulqdq"
    return "pclmulqdq"


def pack(bits: Bits, words: int | None = None) -> Words:
    """``bits`` 64 to a little-endian word, zero-padded to ``words`` words (default: as few as hold them)."""
    size = _ceil_div(bits.size, 64) if words is None else words
    packed = np.zeros(size * 8, dtype=np.uint8)
    packed[: _ceil_div(bits.size, 8)] = np.packbits(bits, bitorder="little")
    return packed.view("<u8")


def _block_shape(output_bits: int) -> tuple[int, int]:
    """``(q, N)``: the words of a leaf and of a square block, ``N = q·2^d >= output_bits / 64`` and ``q`` a
    multiple of 8 of at most :data:`LEAF_WORDS`, as little above the output as that allows (at most 1/8)."""
    needed = _ceil_div(output_bits, 64)
    levels = 0
    while _ceil_div(needed, 1 << levels) > LEAF_WORDS:
        levels += 1
    leaf = 8 * _ceil_div(_ceil_div(needed, 1 << levels), 8)
    return leaf, leaf << levels


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def toeplitz_hash(key_words: Words, input_bits: int, seed: Bits, output_bits: int) -> Bits:
    """``y[i] = XOR_j s[i − j + n − 1]·x[j]`` for i < m (amplify's convention), from the packed key
    (:func:`pack`; bits from ``input_bits`` on are zero) and the seed's n + m − 1 bits.

    Square blocks of N words: n is rounded up to whole blocks by zero key bits *in front* (that shifts the
    key, and leaves the seed's indices as they are: ``s[i − j' + n' − 1]·x'[j']`` with ``j' = j + n' − n``),
    m up to one block by zero seed bits behind (outputs past m are dropped). Then output block 0 is the sum
    over key blocks J of ``MP(s'[(K − 1 − J)·N : (K + 1 − J)·N], x'[J·N : (J + 1)·N])``, K blocks in all.
    """
    leaf, block = _block_shape(output_bits)
    blocks = _ceil_div(input_bits, 64 * block)
    kernels, lanes = _kernel()
    key = np.zeros(blocks * block, dtype=np.uint64)
    kernels.shift_in(key_words, blocks * block * 64 - input_bits, key)
    seed_words = pack(seed, (blocks + 1) * block)
    out = np.empty(block, dtype=np.uint64)
    scratch = np.empty(5 * block + leaf, dtype=np.uint64)
    kernels.toeplitz_blocks(seed_words, key, block, leaf, out, scratch, lanes)
    return np.unpackbits(out.view(np.uint8), count=output_bits, bitorder="little")


@functools.cache
def _kernel() -> tuple[Any, tuple[int, ...]]:
    """The compiled kernels' module and the lane marker of the width :func:`available` chose. Numba loads
    each kernel from its disk cache on the first call, or compiles it there (about a second) on the
    first run after an install: see amplify.warm_up."""
    width = available()
    if width is None:
        raise RuntimeError("the carry-less kernel cannot run on this machine")
    from qkdd.stages import _clmul_kernels  # noqa: PLC0415  (numba's import is paid only here)

    return _clmul_kernels, _clmul_kernels.WIDE if width == "vpclmulqdq" else _clmul_kernels.NARROW
