"""The benchmark's LeanClient (qkdd/delivery/client.py) without sockets: its requests, and its strict
reader of answers, fed from a fake TLS socket in pieces of any size."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qkdd.delivery.client import ApiError, LeanClient
from qkdd.errors import QkddError

KEY_ID = "5f0c9b9e-0d2b-4d46-a3c5-2f7b0e7f1c11"
KEY = bytes(range(32))
CONTAINER = json.dumps({"keys": [{"key_ID": KEY_ID, "key": base64.b64encode(KEY).decode()}]}).encode()


class _Socket:
    """A KME's side from a script: each request sent makes the next answer readable, ``cut`` bytes per
    receive at most. Keeps what was sent."""

    def __init__(self, answers: list[bytes], cut: int = 1 << 16) -> None:
        self.answers, self.cut, self.sent, self.readable = answers, cut, b"", b""

    def sendall(self, data: bytes) -> None:
        self.sent += data
        self.readable += self.answers.pop(0)

    def recv(self, size: int) -> bytes:
        size = min(size, self.cut)
        piece, self.readable = self.readable[:size], self.readable[size:]
        return piece


def _client(*answers: bytes, cut: int = 1 << 16) -> tuple[LeanClient, _Socket]:
    client = LeanClient.__new__(LeanClient)
    fake = _Socket(list(answers), cut)
    client._socket = fake  # type: ignore[assignment]
    client._host = b"127.0.0.1"
    client._requests = {}
    return client, fake


def _answer(body: bytes = CONTAINER, status: str = "200 ", headers: list[str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    lines += (
        headers if headers is not None else ["content-type: application/json", f"content-length: {len(body)}"]
    )
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@given(cut=st.integers(1, 400))
def test_a_key_is_read_whole_however_the_answer_arrives(cut: int) -> None:
    client, fake = _client(_answer(), _answer(), cut=cut)
    assert client.enc_key("sae-bob") == (KEY_ID, KEY)
    assert client.dec_key("sae-alice", KEY_ID) == KEY
    first, second = fake.sent.split(b"POST ")[1:]
    assert first.startswith(b"/api/v1/keys/sae-bob/enc_keys HTTP/1.1\r\n") and first.endswith(
        b'{"number": 1}'
    )
    assert second.endswith(b'{"key_IDs": [{"key_ID": "%s"}]}' % KEY_ID.encode())
    head, body = second.split(b"\r\n\r\n")
    assert b"content-type: application/json" in head and b"content-length: %d" % len(body) in head


def test_an_error_answer_is_an_api_error() -> None:
    client, _ = _client(_answer(b'{"message": "no"}', "503 Service Unavailable"))
    with pytest.raises(ApiError) as caught:
        client.enc_key("sae-bob")
    assert caught.value.status == 503 and caught.value.body == {"message": "no"}


@pytest.mark.parametrize(
    "answer",
    [
        b"",  # the connection closed
        _answer(status="200"),  # no space after the code
        _answer().replace(b"HTTP/1.1", b"HTTP/1.0"),
        _answer(headers=["content-type: application/json"]),  # no Content-Length
        _answer(headers=["content-type: application/json", "content-length: -1"]),
        _answer(headers=["content-type: application/json", "transfer-encoding: chunked"]),
        _answer(headers=["content-type: application/json", f"content-length: {len(CONTAINER)}"] * 2),
        _answer(headers=["content-type: text/plain", f"content-length: {len(CONTAINER)}"]),
        _answer(headers=["content-type: application/json", f"content-length: {len(CONTAINER)}", " folded"]),
        _answer(
            headers=[
                "content-type: application/json",
                f"content-length: {len(CONTAINER)}",
                "connection: close",
            ]
        ),
        _answer() + b"HTTP/1.1 200 ",  # more than the answer
        _answer()[:-1],  # less: the connection closed within the body
        _answer(b"{}"),
        _answer(b"[1]"),
        _answer(b"not json"),
        _answer(json.dumps({"keys": [{"key_ID": KEY_ID, "key": "not base64!"}]}).encode()),
        _answer(json.dumps({"keys": [{"key_ID": 5, "key": ""}]}).encode()),
        _answer(json.dumps({"keys": []}).encode()),
        _answer(CONTAINER[:-2] + b", " + CONTAINER[10:-1] + b"]}"),  # two keys
    ],
)
def test_a_broken_answer_is_an_error_not_a_key(answer: bytes) -> None:
    client, _ = _client(answer)
    with pytest.raises(QkddError) as caught:
        client.enc_key("sae-bob")
    assert not isinstance(caught.value, ApiError)


def test_dec_keys_must_answer_the_key_asked_for() -> None:
    client, _ = _client(_answer())
    with pytest.raises(QkddError, match="answered the key"):
        client.dec_key("sae-alice", "00000000-0000-4000-8000-000000000000")
