"""A small ETSI GS QKD 014 client over one kept-alive mutual-TLS connection (the demo and the benchmark).

Applications normally use their own HTTP stack (README "Getting keys": curl); this one needs only the
standard library.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

from qkdd.errors import QkddError


class ApiError(QkddError):
    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message", "") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class Client:
    """An SAE talking to its KME at ``host:port`` with its certificate and key, trusting ``ca``."""

    def __init__(self, host: str, port: int, certificate: Path, key: Path, ca: Path, timeout: float = 30.0):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        context.load_cert_chain(str(certificate), str(key))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._connection = http.client.HTTPSConnection(host, port, context=context, timeout=timeout)

    def close(self) -> None:
        self._connection.close()

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One request; returns (status, decoded JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        self._connection.request(method, f"/api/v1/keys/{path}", body=data, headers=headers)
        response = self._connection.getresponse()
        payload = response.read()
        return response.status, json.loads(payload) if payload else None

    def _ok(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.request(method, path, body)
        if status != 200:
            raise ApiError(status, answer)
        return answer

    def status(self, slave: str) -> dict[str, Any]:
        answer: dict[str, Any] = self._ok("GET", f"{quote(slave)}/status")
        return answer

    def enc_keys(self, slave: str, number: int = 1, size: int | None = None) -> list[tuple[str, bytes]]:
        request: dict[str, Any] = {"number": number}
        if size is not None:
            request["size"] = size
        return _keys(self._ok("POST", f"{quote(slave)}/enc_keys", request))

    def dec_keys(self, master: str, key_ids: list[str]) -> list[tuple[str, bytes]]:
        request = {"key_IDs": [{"key_ID": key_id} for key_id in key_ids]}
        return _keys(self._ok("POST", f"{quote(master)}/dec_keys", request))


def _keys(container: dict[str, Any]) -> list[tuple[str, bytes]]:
    return [(k["key_ID"], base64.b64decode(k["key"])) for k in container["keys"]]
