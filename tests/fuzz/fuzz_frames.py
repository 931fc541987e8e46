"""Fuzz target for long runs with atheris: arbitrary bytes against the frame decoder and the engine.

    pip install atheris
    python -m tests.fuzz.fuzz_frames -max_total_time=3600 fuzz-corpus/

Without atheris, ``python -m tests.fuzz.fuzz_frames FILE...`` replays saved inputs (a crash file that
atheris wrote, say). The first input byte picks the target:

* 0: the bytes are a TCP stream: the frame decoder, then envelope and message decoding;
* 1: the same stream, fed to Bob's engine right after his hello (the handshake states);
* 2: the rest is a message body that arrives correctly framed, sequenced and MAC'd at Bob after a
  real handshake, so the fuzzer reaches every state's message handling, not only the MAC check.

The only exception allowed out of qkdd is RemoteProtocolError (an error frame and a close); anything
else is a bug that atheris reports with the input that caused it. tests/test_fuzz.py keeps the target
working in CI.
"""

from __future__ import annotations

import sys

from qkdd import wire
from qkdd.engine import State
from qkdd.errors import RemoteProtocolError
from tests.helpers import ConnectionPair, make_engine


def _stream(data: bytes, feed_engine: bool) -> None:
    decoder = wire.FrameDecoder()
    bob = None
    if feed_engine:
        bob, _ = make_engine("bob")
        bob.initiate()
    for payload in decoder.feed(data):
        envelope = wire.decode_envelope(payload)
        wire.decode_message(envelope.body)
        if bob is not None and bob.state is not State.CLOSED:
            bob.receive_frame(payload)
    decoder.check_eof()


def _after_handshake(body: bytes) -> None:
    pair = ConnectionPair()
    pair.connect()
    alice = pair.alice
    seq = alice._send_seq
    frame = wire.encode_frame(seq, body, alice._macs["alice"].tag(seq, body))
    (payload,) = wire.FrameDecoder().feed(frame)
    pair.bob.receive_frame(payload)


def one_input(data: bytes) -> None:
    if not data:
        return
    target, rest = data[0] % 3, data[1:]
    try:
        if target == 2:
            _after_handshake(rest)
        else:
            _stream(rest, feed_engine=target == 1)
    except RemoteProtocolError:
        pass


def main(argv: list[str]) -> None:
    try:
        import atheris  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - optional
    except ImportError:
        for path in argv[1:]:
            with open(path, "rb") as f:
                one_input(f.read())
        return
    atheris.instrument_all()  # coverage feedback from every loaded module, qkdd's included
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
