"""The ETSI 014 request handling of qkdd/delivery/http.py, without sockets: only 4xx for bad input."""

from __future__ import annotations

import json
from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from qkdd.delivery.http import ApiServer


class _Keys:
    """A key manager that hands out one key to anyone and knows every key ID."""

    async def status(self, caller: str, other: str) -> dict[str, Any]:
        return {"source_KME_ID": "a", "target_KME_ID": "b"}

    async def enc_keys(self, caller: str, saes: list[str], number: int, size: int) -> list[tuple[str, bytes]]:
        return [("5f0c9b9e-0d2b-4d46-a3c5-2f7b0e7f1c11", bytes(size // 8))] * min(number, 2)

    async def dec_keys(self, caller: str, other: str, ids: list[str]) -> list[tuple[str, bytes]]:
        return [(key_id, bytes(32)) for key_id in ids]


def _answer(method: str, target: str, body: bytes = b"", content_type: str = "application/json") -> Any:
    server = ApiServer(_Keys(), settings=_Settings())  # type: ignore[arg-type]
    return trio.run(server._answer, "sae-a", method, target, body, content_type)


class _Settings:
    key_size = 256
    max_sae_id_count = 4
    max_key_per_request = 128
    saes = ()


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "G\u00c9T"]),
    action=st.sampled_from(["status", "enc_keys", "dec_keys", "nothing", ""]),
    query=st.text(max_size=60),
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=24), inner, max_size=4)
            ),
            max_leaves=12,
        ).map(lambda value: json.dumps(value).encode()),
        st.fixed_dictionaries(
            {},
            optional={
                "number": st.one_of(st.integers(), st.text(max_size=4), st.booleans()),
                "size": st.one_of(st.integers(), st.text(max_size=4)),
                "key_IDs": st.lists(st.dictionaries(st.just("key_ID"), st.text(max_size=40)), max_size=3),
                "additional_slave_SAE_IDs": st.lists(st.text(max_size=8), max_size=5),
            },
        ).map(lambda value: json.dumps(value).encode()),
    ),
    content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]),
)
def test_any_query_and_body_get_an_answer_below_500(
    method: str, action: str, query: str, body: bytes, content_type: str
) -> None:
    status, answer, headers = _answer(method, f"/api/v1/keys/sae-b/{action}?{query}", body, content_type)
    assert status == 200 or 400 <= status < 500, (status, answer)
    assert isinstance(answer, dict)
    if status == 405:
        assert dict(headers)["allow"] in ("GET", "GET, POST")


def test_numbers_are_ascii_digits_in_a_query_and_json_integers_in_a_body() -> None:
    assert _answer("GET", "/api/v1/keys/sae-b/enc_keys?number=2")[0] == 200
    for digits in ("%C2%B2", "%D9%A1", "%EF%BC%91", "1" * 19, "-1", "+1", "1.0"):
        status, answer, _ = _answer("GET", f"/api/v1/keys/sae-b/enc_keys?number={digits}")
        assert status == 400 and "ASCII digits" in answer["message"], digits
    assert _answer("POST", "/api/v1/keys/sae-b/enc_keys", b'{"number": 2}')[0] == 200
    for value in ('"2"', "true", "2.0", "[2]"):
        status, answer, _ = _answer("POST", "/api/v1/keys/sae-b/enc_keys", f'{{"number": {value}}}'.encode())
        assert status == 400 and "JSON integer" in answer["message"], value


def test_a_body_must_be_json_and_other_methods_get_405_with_allow() -> None:
    status, answer, _ = _answer("POST", "/api/v1/keys/sae-b/enc_keys", b'{"number": 1}', "text/plain")
    assert status == 400 and "application/json" in answer["message"]
    assert _answer("POST", "/api/v1/keys/sae-b/enc_keys", b"", "")[0] == 200  # no body: the defaults
    for method, action, allow in (("HEAD", "status", "GET"), ("DELETE", "enc_keys", "GET, POST")):
        status, answer, headers = _answer(method, f"/api/v1/keys/sae-b/{action}")
        assert status == 405 and dict(headers) == {"allow": allow} and method in answer["message"]
