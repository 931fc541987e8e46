"""Compiled loops behind :mod:`qkdd.stages.clmul` (the carry-less Toeplitz hash); the module docstring
there says what they compute.

Every function here is module level and cached on disk (``cache=True``), so that a daemon loads the
machine code numba compiled on an earlier run instead of compiling it again at start-up. The instruction
width is a compile-time choice: it travels as the *length of a tuple type* (:data:`WIDE` or
:data:`NARROW`), so each width is its own specialisation of the same functions, with its own cache entry
(numba keys the cache on the argument types and on the CPU's name and features). Importing this module
compiles nothing, so it is safe on any machine; calling a kernel compiles the instruction it names, which
aborts LLVM where the CPU lacks it: callers ask :func:`qkdd.stages.clmul.available` first.
"""

from __future__ import annotations

from typing import Any, no_type_check

import numpy as np
import numpy.typing as npt
from llvmlite import ir  # type: ignore[import-untyped]
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

Words = npt.NDArray[np.uint64]

WIDE = (0,) * 8
"""Lane marker for the 512-bit VPCLMULQDQ: eight words per step (its length is what counts)."""
NARROW = (0,) * 2
"""Lane marker for the 128-bit PCLMULQDQ: two words per step."""

_INSTRUCTION = {2: "llvm.x86.pclmulqdq", 8: "llvm.x86.pclmulqdq.512"}


@no_type_check  # numba's and llvmlite's code builders: typed by numba when it compiles, not by mypy
def _clmul_dot_typing(typingctx: Any, w_address: Any, v_address: Any, words: Any, lanes_marker: Any) -> Any:
    """XOR over k < words of the 128-bit carry-less products w[k]·v[k], as (low word, high word);
    ``words`` a multiple of 8. Each (V)PCLMULQDQ multiplies the even (imm 0x00) or odd (0x11) words of
    its 128-bit lanes, so the two together take ``lanes`` words per step (the marker's length)."""
    if not isinstance(lanes_marker, types.UniTuple) or lanes_marker.count not in _INSTRUCTION:
        return None  # a typing error at the call: no such width
    lanes = lanes_marker.count
    int8, int32, int64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
    vector = ir.VectorType(int64, lanes)
    signature = types.UniTuple(types.uint64, 2)(types.uintp, types.uintp, types.intp, lanes_marker)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        w_at, v_at, count, _ = args
        clmul = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(vector, [vector, vector, int8]), _INSTRUCTION[lanes]
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


_clmul_dot: Any = intrinsic(_clmul_dot_typing)


_ONE, _TOP = np.uint64(1), np.uint64(63)


@njit(nogil=True, cache=True)
def _leaf(w: Words, v: Words, y: Words, scratch: Words, lanes: tuple[int, ...]) -> None:
    """MP(w, v) word by word: ``P_a = XOR_b w[a − b + q − 1]·v[b]`` (128 bits) for a = 0..q, and
    output word a is bits 63..126 of ``P_a + z^64·P_(a+1)``. With v reversed into ``scratch`` each
    ``P_a`` is a dot product of contiguous words."""
    q = v.size
    for k in range(q):
        scratch[k] = v[q - 1 - k]
    low_before, high_before = _clmul_dot(w.ctypes.data, scratch.ctypes.data, q, lanes)
    for a in range(1, q + 1):
        low, high = _clmul_dot(w.ctypes.data + np.uint64(8 * a), scratch.ctypes.data, q, lanes)
        y[a - 1] = (low_before >> _TOP) | (high_before << _ONE) ^ (low << _ONE)
        low_before, high_before = low, high


@njit(nogil=True, cache=True)
def _middle(w: Words, v: Words, y: Words, scratch: Words, q: int, lanes: tuple[int, ...]) -> None:
    """y = MP(w, v) (clmul's module docstring); ``scratch`` holds at least 4·N + q words."""
    size = v.size
    if size <= q:
        _leaf(w, v, y, scratch, lanes)
        return
    h = size // 2
    summed, window, shared = scratch[:h], scratch[h : 3 * h], scratch[3 * h : 4 * h]
    rest = scratch[4 * h :]
    for i in range(h):
        summed[i] = v[i] ^ v[h + i]
    _middle(w[h : 3 * h], summed, shared, rest, q, lanes)
    for i in range(2 * h):
        window[i] = w[i] ^ w[h + i]
    _middle(window, v[h:], y[:h], rest, q, lanes)
    for i in range(2 * h):
        window[i] = w[2 * h + i] ^ w[h + i]
    _middle(window, v[:h], y[h:], rest, q, lanes)
    for i in range(h):
        y[i] ^= shared[i]
        y[h + i] ^= shared[i]


@njit(nogil=True, cache=True)
def toeplitz_blocks(
    seed: Words, key: Words, block: int, q: int, out: Words, scratch: Words, lanes: tuple[int, ...]
) -> None:
    """out = the sum over key blocks J of MP(seed[(K − 1 − J)·N : (K + 1 − J)·N], key block J), with the
    word products of the width ``lanes`` names (:data:`WIDE` or :data:`NARROW`)."""
    blocks = key.size // block
    part, rest = scratch[:block], scratch[block:]
    out[:] = 0
    for j in range(blocks):
        start = (blocks - 1 - j) * block
        _middle(seed[start : start + 2 * block], key[j * block : (j + 1) * block], part, rest, q, lanes)
        for i in range(block):
            out[i] ^= part[i]


@njit(nogil=True, cache=True)
def shift_in(words: Words, shift: int, out: Words) -> None:
    """out |= words moved ``shift`` bits up (bits moved past the end of ``out`` must be zero)."""
    skip, bits = shift // 64, np.uint64(shift % 64)
    for i in range(words.size):
        out[skip + i] |= words[i] << bits
        if bits and skip + i + 1 < out.size:
            out[skip + i + 1] |= words[i] >> (np.uint64(64) - bits)
