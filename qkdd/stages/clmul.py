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
from types import SimpleNamespace
from typing import Any, no_type_check

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
    kernel = _kernel()
    key = np.zeros(blocks * block, dtype=np.uint64)
    kernel.shift_in(key_words, blocks * block * 64 - input_bits, key)
    seed_words = pack(seed, (blocks + 1) * block)
    out = np.empty(block, dtype=np.uint64)
    kernel.toeplitz_blocks(seed_words, key, block, leaf, out, np.empty(5 * block + leaf, dtype=np.uint64))
    return np.unpackbits(out.view(np.uint8), count=output_bits, bitorder="little")


@functools.cache
def _kernel() -> Any:
    """The compiled functions (numba compiles each on its first call: about a second, see amplify.warm_up)."""
    width = available()
    if width is None:
        raise RuntimeError("the carry-less kernel cannot run on this machine")
    return _compile(width == "vpclmulqdq")


@no_type_check  # numba's code: typed by numba when it compiles, not by mypy
def _compile(wide: bool) -> Any:
    import numba  # noqa: PLC0415
    from llvmlite import ir  # noqa: PLC0415
    from numba import types  # noqa: PLC0415
    from numba.core import cgutils  # noqa: PLC0415
    from numba.extending import intrinsic  # noqa: PLC0415

    lanes = 8 if wide else 2
    int8, int32, int64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    vector = ir.VectorType(int64, lanes)
    name = "llvm.x86.pclmulqdq.512" if wide else "llvm.x86.pclmulqdq"

    @intrinsic
    def clmul_dot(typingctx: Any, w_address: Any, v_address: Any, words: Any) -> Any:
        """XOR over k < words of the 128-bit carry-less products w[k]·v[k], as (low word, high word);
        ``words`` a multiple of 8. Each (V)PCLMULQDQ multiplies the even (imm 0x00) or odd (0x11) words of
        its 128-bit lanes, so the two together take ``lanes`` words per step."""
        signature = types.UniTuple(types.uint64, 2)(types.uintp, types.uintp, types.intp)

        def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
            w_at, v_at, count = args
            clmul = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vector, [vector, vector, int8]), name
            )
            total = cgutils.alloca_once_value(builder, ir.Constant(vector, None))
            steps = builder.udiv(count, ir.Constant(int64, lanes))
            with cgutils.for_range(builder, steps) as loop:
                offset = builder.mul(loop.index, ir.Constant(int64, 8 * lanes))
                w = builder.load(builder.inttoptr(builder.add(w_at, offset), vector.as_pointer()), align=8)
                v = builder.load(builder.inttoptr(builder.add(v_at, offset), vector.as_pointer()), align=8)
                even = builder.call(clmul, [w, v, ir.Constant(int8, 0x00)])
                odd = builder.call(clmul, [w, v, ir.Constant(int8, 0x11)])
                builder.store(builder.xor(builder.load(total), builder.xor(even, odd)), total)
            result = builder.load(total)
            low = builder.extract_element(result, ir.Constant(int32, 0))
            high = builder.extract_element(result, ir.Constant(int32, 1))
            for lane in range(2, lanes, 2):
                low = builder.xor(low, builder.extract_element(result, ir.Constant(int32, lane)))
                high = builder.xor(high, builder.extract_element(result, ir.Constant(int32, lane + 1)))
            return context.make_tuple(builder, sig.return_type, [low, high])

        return signature, codegen

    jit = numba.njit(nogil=True)
    one, top = np.uint64(1), np.uint64(63)

    @jit
    def leaf(w: Words, v: Words, y: Words, scratch: Words) -> None:
        """MP(w, v) word by word: ``P_a = XOR_b w[a − b + q − 1]·v[b]`` (128 bits) for a = 0..q, and
        output word a is bits 63..126 of ``P_a + z^64·P_(a+1)``. With v reversed into ``scratch`` each
        ``P_a`` is a dot product of contiguous words."""
        q = v.size
        for k in range(q):
            scratch[k] = v[q - 1 - k]
        low_before, high_before = clmul_dot(w.ctypes.data, scratch.ctypes.data, q)
        for a in range(1, q + 1):
            low, high = clmul_dot(w.ctypes.data + np.uint64(8 * a), scratch.ctypes.data, q)
            y[a - 1] = (low_before >> top) | (high_before << one) ^ (low << one)
            low_before, high_before = low, high

    @jit
    def middle(w: Words, v: Words, y: Words, scratch: Words, q: int) -> None:
        """y = MP(w, v) (the module docstring); ``scratch`` holds at least 4·N + q words."""
        size = v.size
        if size <= q:
            leaf(w, v, y, scratch)
            return
        h = size // 2
        summed, window, shared = scratch[:h], scratch[h : 3 * h], scratch[3 * h : 4 * h]
        rest = scratch[4 * h :]
        for i in range(h):
            summed[i] = v[i] ^ v[h + i]
        middle(w[h : 3 * h], summed, shared, rest, q)
        for i in range(2 * h):
            window[i] = w[i] ^ w[h + i]
        middle(window, v[h:], y[:h], rest, q)
        for i in range(2 * h):
            window[i] = w[2 * h + i] ^ w[h + i]
        middle(window, v[:h], y[h:], rest, q)
        for i in range(h):
            y[i] ^= shared[i]
            y[h + i] ^= shared[i]

    @jit
    def toeplitz_blocks(seed: Words, key: Words, block: int, q: int, out: Words, scratch: Words) -> None:
        """out = the sum over key blocks J of MP(seed[(K − 1 − J)·N : (K + 1 − J)·N], key block J)."""
        blocks = key.size // block
        part, rest = scratch[:block], scratch[block:]
        out[:] = 0
        for j in range(blocks):
            start = (blocks - 1 - j) * block
            middle(seed[start : start + 2 * block], key[j * block : (j + 1) * block], part, rest, q)
            for i in range(block):
                out[i] ^= part[i]

    @jit
    def shift_in(words: Words, shift: int, out: Words) -> None:
        """out |= words moved ``shift`` bits up (bits moved past the end of ``out`` must be zero)."""
        skip, bits = shift // 64, np.uint64(shift % 64)
        for i in range(words.size):
            out[skip + i] |= words[i] << bits
            if bits and skip + i + 1 < out.size:
                out[skip + i + 1] |= words[i] >> (np.uint64(64) - bits)

    return SimpleNamespace(shift_in=shift_in, toeplitz_blocks=toeplitz_blocks)
