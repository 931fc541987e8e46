"""The atheris target of tests/fuzz stays runnable: a bounded hypothesis run of it in CI."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkdd import wire
from tests.fuzz.fuzz_frames import one_input

SEEDS = [
    b"\x00" + wire.encode_frame(0, wire.encode_message("error", code="internal", message="", versions=[1])),
    b"\x01" + b"\x00\x00\x00\x05hello",
    b"\x02" + msgpack.packb({"type": "round_start", "round": 0, "frame": 0, "pulses": 1, "auth": "psk"}),
    b"\x02" + msgpack.packb({"type": "abort", "round": 1 << 62, "reason": "x" * 300}),
]


def test_the_fuzz_target_takes_its_seeds() -> None:
    for seed in SEEDS:
        one_input(seed)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_the_fuzz_target_never_raises_anything_but_protocol_errors(data: bytes) -> None:
    one_input(data)
