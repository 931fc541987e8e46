"""Config errors name the offending key and the expected form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from qkdd import config
from qkdd.errors import InputError


def base(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "role": "alice",
        "link_id": "l",
        "state_dir": "state",
        "network": {"peer": "127.0.0.1:7700"},
        "auth": {"psk_file": "psk"},
    }
    raw.update(overrides)
    return raw


def test_minimal_config_and_relative_paths(tmp_path: Path) -> None:
    loaded = config.from_mapping(base(), tmp_path)
    assert loaded.state_dir == tmp_path / "state" and loaded.psk_file == tmp_path / "psk"
    assert loaded.peer == config.Address("127.0.0.1", 7700) and loaded.listen is None
    assert loaded.post.key_block_bits == 256 and loaded.link_backend == "sim"


def test_etsi014_unix_socket_and_uids(tmp_path: Path) -> None:
    saes = [
        {"id": "gw", "common_name": "gw", "uid": 1001},
        {"id": "local", "uid": 0},
        {"id": "cn", "common_name": "cn"},
    ]
    loaded = config.from_mapping(etsi014(unix_socket="api.sock", sae=saes), tmp_path).etsi014
    assert loaded is not None and loaded.unix_socket == tmp_path / "api.sock"
    assert [(s.id, s.common_name, s.uid) for s in loaded.saes] == [
        ("gw", "gw", 1001),
        ("local", None, 0),
        ("cn", "cn", None),
    ]
    # in the state directory, which qkdd run creates, before it exists
    loaded = config.from_mapping(etsi014(unix_socket="state/api.sock", sae=saes), tmp_path).etsi014
    assert loaded is not None and loaded.unix_socket == tmp_path / "state" / "api.sock"
    assert config.from_mapping(etsi014(), tmp_path).etsi014.unix_socket is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"role": "eve"}, "role: expected"),
        ({"link_id": ""}, "link_id: expected a non-empty string"),
        ({"colour": 1}, "colour: unknown key"),
        ({"network": {"peer": "nohost"}}, 'network.peer: expected "HOST:PORT"'),
        ({"network": {"peer": "h:99999"}}, "network.peer"),
        ({"network": {}}, "set exactly one of network.listen"),
        ({"network": {"peer": "h:1", "listen": "h:2"}}, "set exactly one"),
        ({"network": {"peer": "h:1", "max_frame_bytes": 10}}, "network.max_frame_bytes"),
        ({"auth": {"psk_file": "psk", "method": "x509"}}, "auth.method"),
        (
            {"auth": {"method": "pki", "certificate_file": "c", "key_file": "k", "ca_file": "ca"}},
            "auth.peer_name",
        ),
        ({"auth": {}}, "auth.psk_file"),
        ({"post": {"cascade_variant": "turbo"}}, "post.cascade_variant"),
        ({"post": {"key_block_bits": 100}}, "post.key_block_bits: expected a multiple of 8"),
        ({"post": {"qber_threshold": 0.7}}, "post.qber_threshold"),
        ({"post": {"eps_sec": "small"}}, "post.eps_sec"),
        ({"timeouts": {"round": 0}}, "timeouts.round"),
        ({"run": {"max_rounds": -1}}, "run.max_rounds"),
        ({"link": {"backend": "sim", "other": {}}}, "link.other: unknown key"),
        ({"network": "x"}, "network: expected a table"),
        ({"metrics": "127.0.0.1:9770"}, r"metrics: expected a table \(\[metrics\]\)"),
        ({"metrics": {}}, 'metrics.listen: expected "HOST:PORT"'),
        ({"metrics": {"listen": "9770"}}, 'metrics.listen: expected "HOST:PORT"'),
        ({"metrics": {"listen": "h:70000"}}, "metrics.listen: expected .* a port in 0..65535"),
        ({"metrics": {"listen": "h:1", "path": "/m"}}, "metrics.path: unknown key; expected one of listen"),
    ],
)
def test_errors_name_the_key(overrides: dict[str, Any], match: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=match):
        config.from_mapping(base(**overrides), tmp_path)


def test_metrics_are_off_unless_the_table_says_where(tmp_path: Path) -> None:
    assert config.from_mapping(base(), tmp_path).metrics is None
    loaded = config.from_mapping(base(metrics={"listen": "[::1]:9770"}), tmp_path)
    assert loaded.metrics == config.Address("::1", 9770)


def test_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot read"):
        config.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("role = ")
    with pytest.raises(InputError, match="not valid TOML"):
        config.load(bad)


def test_rendered_configs_load(tmp_path: Path) -> None:
    for role, listen, peer in (("alice", None, "b:1"), ("bob", "0.0.0.0:7700", None)):
        path = tmp_path / f"{role}.toml"
        path.write_text(
            config.render(
                role,
                link_id="l",
                state_dir="s",
                psk_file="psk",
                listen=listen,
                peer=peer,
                sim={"distance_km": 5.0, "intensities": [0.5, 0.1, 0.0]},
            )
        )
        loaded = config.load(path)
        assert loaded.role == role and loaded.link_options["distance_km"] == 5.0


def etsi014(**overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {
        "listen": "127.0.0.1:8443",
        "certificate_file": "kme.crt",
        "key_file": "kme.key",
        "ca_file": "ca.crt",
        "sae": [{"id": "sae-1", "common_name": "sae-1"}, {"id": "sae-2", "fingerprint": "AB:" * 31 + "CD"}],
    }
    table.update(overrides)
    return base(etsi014=table)


def test_etsi014_table(tmp_path: Path) -> None:
    loaded = config.from_mapping(etsi014(), tmp_path).etsi014
    assert loaded is not None and loaded.kme_id == "l-alice" and loaded.ca == tmp_path / "ca.crt"
    assert loaded.saes[1].fingerprint == "ab" * 31 + "cd" and loaded.key_size == 256
    assert loaded.batch_size == 8192
    assert config.from_mapping(etsi014(batch_size=0), tmp_path).etsi014.batch_size == 0  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"listen": "nope"}, "etsi014.listen"),
        ({"key_size": 100}, "etsi014.key_size: expected a multiple of 8"),
        ({"batch_size": 100}, "etsi014.batch_size: expected a multiple of 8"),
        ({"batch_size": -8}, "etsi014.batch_size"),
        ({"min_key_size": 512}, "min_key_size <= key_size"),
        ({"max_sae_id_count": 16}, "etsi014.max_sae_id_count"),
        ({"sae": []}, "at least one"),
        ({"sae": [{"id": "a"}]}, r"etsi014.sae\[0\]: set exactly one"),
        ({"sae": [{"id": "a", "fingerprint": "zz"}]}, "SHA-256 in hex"),
        ({"sae": [{"id": "a/b", "common_name": "x"}]}, "no '/'"),
        ({"sae": [{"id": "a", "common_name": "x"}, {"id": "a", "common_name": "y"}]}, "same id"),
        ({"colour": "red"}, "etsi014.colour: unknown key"),
        ({"sae": [{"id": "a", "common_name": "x", "fingerprint": "ab" * 32}]}, "not both"),
        ({"sae": [{"id": "a", "uid": 1000}]}, r"etsi014.sae\[0\].uid: an SAE known by its uid needs"),
        ({"unix_socket": "api.sock"}, "etsi014.unix_socket: no \\[\\[etsi014.sae\\]\\] has a uid"),
        (
            {"unix_socket": "api.sock", "sae": [{"id": "a", "uid": -1}]},
            r"etsi014.sae\[0\].uid: expected an integer",
        ),
        (
            {"unix_socket": "api.sock", "sae": [{"id": "a", "uid": True}]},
            r"etsi014.sae\[0\].uid: expected an integer",
        ),
        (
            {"unix_socket": "api.sock", "sae": [{"id": "a", "uid": 1 << 32}]},
            r"etsi014.sae\[0\].uid: expected an integer",
        ),
        (
            {"unix_socket": "api.sock", "sae": [{"id": "a", "uid": 7}, {"id": "b", "uid": 7}]},
            r"etsi014.sae\[1\].uid: uid 7 is also the uid of 'a'",
        ),
        (
            {"unix_socket": "", "sae": [{"id": "a", "uid": 7}]},
            "etsi014.unix_socket: expected a non-empty string",
        ),
        (
            {"unix_socket": 7, "sae": [{"id": "a", "uid": 7}]},
            "etsi014.unix_socket: expected a non-empty string",
        ),
        (
            {"unix_socket": "nowhere/api.sock", "sae": [{"id": "a", "uid": 7}]},
            "the folder .*nowhere does not exist",
        ),
        ({"unix_socket": "x" * 120, "sae": [{"id": "a", "uid": 7}]}, "a Unix socket path has at most 107"),
        ({"unix_socket": ".", "sae": [{"id": "a", "uid": 7}]}, "is a folder; name the socket file in it"),
    ],
)
def test_etsi014_errors_name_the_key(overrides: dict[str, Any], match: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=match):
        config.from_mapping(etsi014(**overrides), tmp_path)


def _socket_only(**overrides: Any) -> dict[str, Any]:
    table: dict[str, Any] = {"unix_socket": "api.sock", "sae": [{"id": "local", "uid": 1000}]}
    table.update(overrides)
    return base(etsi014=table)


def test_etsi014_may_serve_only_the_unix_socket(tmp_path: Path) -> None:
    loaded = config.from_mapping(_socket_only(), tmp_path).etsi014
    assert loaded is not None and loaded.listen is None and loaded.certificate is None
    assert loaded.unix_socket == tmp_path / "api.sock"


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (
            {"certificate_file": "kme.crt"},
            "etsi014.certificate_file: no etsi014.listen, so nothing serves TLS",
        ),
        ({"sae": [{"id": "gw", "common_name": "gw"}]}, "'gw' is known by its certificate"),
        ({"listen": "127.0.0.1:8443"}, "etsi014.certificate_file: expected a non-empty string"),
    ],
)
def test_a_socket_only_api_refuses_what_needs_tls(
    overrides: dict[str, Any], match: str, tmp_path: Path
) -> None:
    with pytest.raises(InputError, match=match):
        config.from_mapping(_socket_only(**overrides), tmp_path)
