"""Daemon configuration: a TOML file turned into frozen dataclasses.

Every error names the offending key (``network.peer``) and the expected form. Relative paths
(``state_dir``, ``auth.psk_file``) are relative to the config file's folder. README "Configuration"
lists every key; ``qkdd init`` writes a commented file.
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qkdd import spec
from qkdd.errors import InputError
from qkdd.stages import cascade, estimation, keylength

DEFAULT_WINDOW = 64
"""Rounds in flight on one session unless ``run.window`` says otherwise (qkdp-v2.md §13)."""
MAX_WINDOW = 64
MAX_UNIX_PATH = 107
"""Bytes of a Unix socket path (``sun_path`` holds 108 with the terminating NUL)."""
MAX_UID = (1 << 32) - 2
"""The largest user ID (``(uid_t) -1`` means "no user")."""
DEFAULT_PORT = 7700
"""The port ``qkdd init`` has Bob listen on when neither ``--listen`` nor ``--peer`` names one."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: object, key: str) -> Address:
    if not isinstance(text, str) or ":" not in text:
        raise InputError(f'{key}: expected "HOST:PORT", got {text!r}')
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InputError(f'{key}: expected "HOST:PORT" with a port in 0..65535, got {text!r}')
    return Address(host, int(port))


@dataclass(frozen=True)
class PostProcessing:
    cascade_variant: str = cascade.DEFAULT_VARIANT
    qber_threshold: float = estimation.DEFAULT_THRESHOLD
    z_sample_fraction: float = 0.0
    qber_prior: float = 0.02
    eps_sec: float = keylength.DEFAULT_EPS_SEC
    eps_cor: float = keylength.DEFAULT_EPS_COR
    key_block_bits: int = 256


@dataclass(frozen=True)
class PkiFiles:
    certificate: Path
    key: Path
    ca: Path
    peer_name: str


@dataclass(frozen=True)
class Authentication:
    reserve_switch_bits: int = 4096
    reserve_bits_per_round: int = 2048
    reserve_target_bits: int = 65536
    fallback_to_psk: bool = False


@dataclass(frozen=True)
class SaeIdentity:
    """An SAE of this site and how it is recognised: by its TLS client certificate (a subject common name,
    or the SHA-256 fingerprint of the certificate, lower-case hex, no colons), and/or on the Unix socket by
    the user ID of the connecting process."""

    id: str
    common_name: str | None = None
    fingerprint: str | None = None
    uid: int | None = None


@dataclass(frozen=True)
class Etsi014:
    """``[etsi014]``: the key delivery API of this site: ETSI GS QKD 014 over mutual TLS on ``listen``
    (with the three files), over ``unix_socket`` for SAEs of this host, or both."""

    listen: Address | None
    certificate: Path | None
    key: Path | None
    ca: Path | None
    saes: tuple[SaeIdentity, ...]
    kme_id: str
    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 128
    max_key_count: int = 100000
    max_sae_id_count: int = 8
    lease_size: int = 65536  # bits Alice leases from Bob at a time for her masters (§19)
    batch_size: int = 8192  # bits enc_keys may allocate ahead for SAEs that ask again (§19; 0: never)
    unix_socket: Path | None = None  # the same API without TLS for SAEs of this host, known by their uid


@dataclass(frozen=True)
class Timeouts:
    handshake: float = spec.load().timeouts["handshake"]
    round: float = spec.load().timeouts["round"]
    idle: float = spec.load().timeouts["idle"]
    shutdown_grace: float = 5.0
    reconnect_max: float = 10.0


@dataclass(frozen=True)
class Config:
    role: str
    link_id: str
    state_dir: Path
    psk_file: Path | None  # PSK bootstrap
    listen: Address | None
    peer: Address | None
    max_frame_bytes: int = spec.load().max_frame_bytes
    link_backend: str = "sim"
    link_options: Mapping[str, Any] = field(default_factory=dict)
    post: PostProcessing = PostProcessing()
    timeouts: Timeouts = Timeouts()
    auth: Authentication = Authentication()
    max_rounds: int = 0  # 0: run until stopped
    round_pause: float = 0.0
    window: int = DEFAULT_WINDOW  # rounds this side lets be open at once (qkdp-v2.md §13)
    source: Path | None = None
    pki: PkiFiles | None = None  # PKI bootstrap
    etsi014: Etsi014 | None = None  # key delivery API
    metrics: Address | None = None  # where Prometheus scrapes /metrics (off without [metrics])


def _take(table: Mapping[str, Any], prefix: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            raise InputError(f"{prefix}{key}: unknown key; expected one of {', '.join(sorted(allowed))}")


def _number(value: object, key: str, *, low: float, high: float = math.inf, integer: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not low <= value <= high:  # type: ignore[operator]
        kind = "an integer" if integer else "a number"
        raise InputError(f"{key}: expected {kind} in [{low}, {high}], got {value!r}")
    return value


def _string(value: object, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise InputError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _table(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise InputError(f"{key}: expected a table ([{key}])")
    return value


def from_mapping(raw: Mapping[str, Any], base: Path) -> Config:
    """Build and check a :class:`Config` from parsed TOML; relative paths resolve against ``base``."""
    _take(
        raw,
        "",
        {
            "role",
            "link_id",
            "state_dir",
            "network",
            "auth",
            "link",
            "post",
            "timeouts",
            "run",
            "etsi014",
            "metrics",
        },
    )
    role = raw.get("role")
    if role not in spec.ROLES:
        raise InputError(f'role: expected "alice" or "bob", got {role!r}')
    link_id = _string(raw.get("link_id"), "link_id")
    if len(link_id.encode()) > 128:
        raise InputError("link_id: at most 128 bytes")
    state_dir = base / _string(raw.get("state_dir"), "state_dir")

    network = _table(raw, "network")
    _take(network, "network.", {"listen", "peer", "max_frame_bytes"})
    listen = parse_address(network["listen"], "network.listen") if network.get("listen") else None
    peer = parse_address(network["peer"], "network.peer") if network.get("peer") else None
    if (listen is None) == (peer is None):
        raise InputError("network: set exactly one of network.listen (accept) and network.peer (connect)")
    max_frame = _number(
        network.get("max_frame_bytes", spec.load().max_frame_bytes),
        "network.max_frame_bytes",
        low=1 << 16,
        high=1 << 30,
        integer=True,
    )

    auth = _table(raw, "auth")
    pki_keys = ("certificate_file", "key_file", "ca_file", "peer_name")
    _take(auth, "auth.", {"method", "psk_file", *pki_keys, *Authentication.__dataclass_fields__})
    method = auth.get("method", "psk")
    if method not in ("psk", "pki"):
        raise InputError(f'auth.method: expected "psk" or "pki", got {method!r}')
    psk_file = base / _string(auth.get("psk_file"), "auth.psk_file") if method == "psk" else None
    pki_files = None
    if method == "pki":
        certificate, key, ca = (base / _string(auth.get(k), f"auth.{k}") for k in pki_keys[:3])
        pki_files = PkiFiles(certificate, key, ca, _string(auth.get("peer_name"), "auth.peer_name"))
    fallback = auth.get("fallback_to_psk", False)
    if not isinstance(fallback, bool):
        raise InputError(f"auth.fallback_to_psk: expected true or false, got {fallback!r}")
    authentication = Authentication(
        reserve_switch_bits=_number(
            auth.get("reserve_switch_bits", 4096),
            "auth.reserve_switch_bits",
            low=512,
            high=1 << 40,
            integer=True,
        ),
        reserve_bits_per_round=_number(
            auth.get("reserve_bits_per_round", 2048),
            "auth.reserve_bits_per_round",
            low=0,
            high=1 << 24,
            integer=True,
        ),
        reserve_target_bits=_number(
            auth.get("reserve_target_bits", 65536),
            "auth.reserve_target_bits",
            low=0,
            high=1 << 40,
            integer=True,
        ),
        fallback_to_psk=fallback,
    )

    link = _table(raw, "link")
    backend = _string(link.get("backend", "sim"), "link.backend")
    _take(link, "link.", {"backend", backend})
    options = link.get(backend, {})
    if not isinstance(options, dict):
        raise InputError(f"link.{backend}: expected a table")

    post_raw = _table(raw, "post")
    _take(post_raw, "post.", set(PostProcessing.__dataclass_fields__))
    variant = post_raw.get("cascade_variant", cascade.DEFAULT_VARIANT)
    if variant not in cascade.VARIANTS:
        raise InputError(
            f"post.cascade_variant: expected one of {', '.join(cascade.VARIANTS)}, got {variant!r}"
        )
    block_bits = _number(
        post_raw.get("key_block_bits", 256), "post.key_block_bits", low=8, high=65536, integer=True
    )
    if block_bits % 8:
        raise InputError(f"post.key_block_bits: expected a multiple of 8, got {block_bits}")
    post = PostProcessing(
        cascade_variant=variant,
        qber_threshold=_number(
            post_raw.get("qber_threshold", 0.11), "post.qber_threshold", low=0.001, high=0.5
        ),
        z_sample_fraction=_number(
            post_raw.get("z_sample_fraction", 0.0), "post.z_sample_fraction", low=0, high=0.5
        ),
        qber_prior=_number(post_raw.get("qber_prior", 0.02), "post.qber_prior", low=0.001, high=0.5),
        eps_sec=_number(
            post_raw.get("eps_sec", keylength.DEFAULT_EPS_SEC), "post.eps_sec", low=1e-30, high=0.1
        ),
        eps_cor=_number(
            post_raw.get("eps_cor", keylength.DEFAULT_EPS_COR), "post.eps_cor", low=1e-30, high=0.1
        ),
        key_block_bits=block_bits,
    )

    timeouts_raw = _table(raw, "timeouts")
    _take(timeouts_raw, "timeouts.", set(Timeouts.__dataclass_fields__))
    defaults = Timeouts()
    timeouts = Timeouts(
        **{
            name: _number(
                timeouts_raw.get(name, getattr(defaults, name)), f"timeouts.{name}", low=0.01, high=86400
            )
            for name in Timeouts.__dataclass_fields__
        }
    )

    run = _table(raw, "run")
    _take(run, "run.", {"max_rounds", "round_pause", "window"})
    etsi014 = _etsi014(raw["etsi014"], base, f"{link_id}-{role}", state_dir) if "etsi014" in raw else None
    metrics = None
    if "metrics" in raw:
        metrics_raw = _table(raw, "metrics")
        _take(metrics_raw, "metrics.", {"listen"})
        if "listen" not in metrics_raw:
            raise InputError('metrics.listen: expected "HOST:PORT" (or leave out [metrics] to export none)')
        metrics = parse_address(metrics_raw["listen"], "metrics.listen")
    return Config(
        role=role,
        link_id=link_id,
        state_dir=state_dir,
        psk_file=psk_file,
        pki=pki_files,
        listen=listen,
        peer=peer,
        max_frame_bytes=max_frame,
        link_backend=backend,
        link_options=dict(options),
        post=post,
        timeouts=timeouts,
        auth=authentication,
        max_rounds=_number(run.get("max_rounds", 0), "run.max_rounds", low=0, integer=True),
        round_pause=_number(run.get("round_pause", 0.0), "run.round_pause", low=0, high=3600),
        window=_number(run.get("window", DEFAULT_WINDOW), "run.window", low=1, high=MAX_WINDOW, integer=True),
        etsi014=etsi014,
        metrics=metrics,
    )


def _etsi014(raw: object, base: Path, default_kme_id: str, state_dir: Path) -> Etsi014:
    if not isinstance(raw, dict):
        raise InputError("etsi014: expected a table ([etsi014])")
    limits = (
        "key_size",
        "min_key_size",
        "max_key_size",
        "max_key_per_request",
        "max_key_count",
        "lease_size",
    )
    files = ("certificate_file", "key_file", "ca_file")
    _take(
        raw,
        "etsi014.",
        {"listen", "kme_id", "sae", "unix_socket", *files, *limits, "max_sae_id_count", "batch_size"},
    )
    values = {
        name: _number(
            raw.get(name, getattr(Etsi014, name)), f"etsi014.{name}", low=1, high=1 << 30, integer=True
        )
        for name in limits
    }
    values["batch_size"] = _number(
        raw.get("batch_size", Etsi014.batch_size), "etsi014.batch_size", low=0, high=1 << 30, integer=True
    )
    for name in ("key_size", "min_key_size", "max_key_size", "lease_size", "batch_size"):
        if values[name] % 8:
            raise InputError(f"etsi014.{name}: expected a multiple of 8, got {values[name]}")
    if not values["min_key_size"] <= values["key_size"] <= values["max_key_size"] <= 1 << 20:
        raise InputError("etsi014: expected min_key_size <= key_size <= max_key_size <= 1048576")
    if values["max_key_per_request"] > 65536:
        raise InputError("etsi014.max_key_per_request: at most 65536")
    saes = []
    uids: dict[int, str] = {}  # uid -> the SAE it names
    entries = raw.get("sae", [])
    if not isinstance(entries, list) or not entries:
        raise InputError("etsi014.sae: expected at least one [[etsi014.sae]] table")
    for i, entry in enumerate(entries):
        where = f"etsi014.sae[{i}]"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: expected a table")
        _take(entry, f"{where}.", {"id", "common_name", "fingerprint", "uid"})
        sae_id = _string(entry.get("id"), f"{where}.id")
        if len(sae_id.encode()) > 128 or "/" in sae_id:
            raise InputError(f"{where}.id: at most 128 bytes and no '/'")
        if "common_name" in entry and "fingerprint" in entry:
            raise InputError(f"{where}: set exactly one of common_name and fingerprint, not both")
        if "common_name" not in entry and "fingerprint" not in entry and "uid" not in entry:
            raise InputError(f"{where}: set exactly one of common_name and fingerprint, or uid, or both")
        uid = entry.get("uid")
        if uid is not None:
            uid = _number(uid, f"{where}.uid", low=0, high=MAX_UID, integer=True)
            if "unix_socket" not in raw:
                raise InputError(f"{where}.uid: an SAE known by its uid needs etsi014.unix_socket")
            if uid in uids:
                raise InputError(f"{where}.uid: uid {uid} is also the uid of {uids[uid]!r}")
            uids[uid] = sae_id
        fingerprint = entry.get("fingerprint")
        if fingerprint is not None:
            fingerprint = _string(fingerprint, f"{where}.fingerprint").replace(":", "").lower()
            if len(fingerprint) != 64 or any(c not in "0123456789abcdef" for c in fingerprint):
                raise InputError(f"{where}.fingerprint: expected the certificate's SHA-256 in hex")
        common_name = entry.get("common_name")
        if common_name is not None:
            common_name = _string(common_name, f"{where}.common_name")
        saes.append(SaeIdentity(sae_id, common_name, fingerprint, uid))
    if len({s.id for s in saes}) != len(saes):
        raise InputError("etsi014.sae: two SAEs have the same id")
    kme_id = _string(raw.get("kme_id", default_kme_id), "etsi014.kme_id")
    if len(kme_id.encode()) > 128:
        raise InputError("etsi014.kme_id: at most 128 bytes")
    certificate = key = ca = listen = None
    if "listen" in raw or "unix_socket" not in raw:  # HTTPS: the address and its three files
        listen = parse_address(raw.get("listen"), "etsi014.listen")
        certificate, key, ca = (base / _string(raw.get(name), f"etsi014.{name}") for name in files)
    else:
        for name in files:
            if name in raw:
                raise InputError(f"etsi014.{name}: no etsi014.listen, so nothing serves TLS")
        for sae in saes:
            if sae.uid is None:
                raise InputError(
                    f"etsi014.sae: {sae.id!r} is known by its certificate, which only etsi014.listen (HTTPS) "
                    "takes; give it a uid or set listen and the TLS files"
                )
    unix_socket = None
    if "unix_socket" in raw:
        unix_socket = _unix_socket(raw["unix_socket"], base, state_dir)
        if not uids:
            raise InputError("etsi014.unix_socket: no [[etsi014.sae]] has a uid, so no one could use it")
    return Etsi014(
        unix_socket=unix_socket,
        listen=listen,
        certificate=certificate,
        key=key,
        ca=ca,
        saes=tuple(saes),
        kme_id=kme_id,
        max_sae_id_count=_number(
            raw.get("max_sae_id_count", Etsi014.max_sae_id_count),
            "etsi014.max_sae_id_count",
            low=0,
            high=15,  # with the slave of the path, at most 16 (protocol/qkdp-v2.toml, key_notice.slaves)
            integer=True,
        ),
        **values,
    )


def _unix_socket(value: object, base: Path, state_dir: Path) -> Path:
    """``etsi014.unix_socket``: a path short enough for ``sun_path``, in an existing folder or in the state
    directory (which ``qkdd run`` creates). Whether a file is already there is the server's business when
    it starts (a stale socket is replaced)."""
    path = base / _string(value, "etsi014.unix_socket")
    if len(bytes(path)) > MAX_UNIX_PATH:
        raise InputError(
            f"etsi014.unix_socket: {path} is {len(bytes(path))} bytes; a Unix socket path has at most "
            f"{MAX_UNIX_PATH}"
        )
    if not path.parent.is_dir() and path.parent != state_dir:
        raise InputError(f"etsi014.unix_socket: the folder {path.parent} does not exist")
    if path.is_dir():
        raise InputError(f"etsi014.unix_socket: {path} is a folder; name the socket file in it")
    return path


def load(path: Path) -> Config:
    """Read and check a config file."""
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"{path}: not valid TOML: {error}") from None
    config = from_mapping(raw, path.resolve().parent)
    return Config(**{**config.__dict__, "source": path})


def render(
    role: str,
    *,
    link_id: str,
    state_dir: str,
    psk_file: str,
    listen: str | None,
    peer: str | None,
    sim: Mapping[str, Any] | None = None,
    max_rounds: int = 0,
    pki: tuple[str, str, str, str] | None = None,
    window: int = DEFAULT_WINDOW,
) -> str:
    """A commented config file (``qkdd init``, ``qkdd demo``); ``pki``: (certificate, key, CA, peer name)."""
    network = f"listen = {_toml_value(listen)}" if listen else f"peer = {_toml_value(peer)}"
    if pki is None:
        bootstrap = f"""method = "psk"
psk_file = {_toml_value(psk_file)}        # the same file on both hosts, mode 0600"""
    else:
        bootstrap = f"""method = "pki"
certificate_file = {_toml_value(pki[0])}
key_file = {_toml_value(pki[1])}          # mode 0600
ca_file = {_toml_value(pki[2])}
peer_name = {_toml_value(pki[3])}         # the common name the peer's certificate must carry"""
    sim_lines = "\n".join(f"{k} = {_toml_value(v)}" for k, v in (sim or {}).items())
    return f"""# qkdd {role} — see README "Configuration" for every key
role = "{role}"
link_id = {_toml_value(link_id)}          # must be the same on both sides
state_dir = {_toml_value(state_dir)}      # key store; never restore it from a backup

[network]
{network}
# max_frame_bytes = 16777216

[auth]
{bootstrap}
# reserve_switch_bits = 4096     # authenticate from the key reserve once it holds this many bits
# reserve_bits_per_round = 2048  # refill per round while the reserve is below reserve_target_bits
# reserve_target_bits = 65536
# fallback_to_psk = false        # true: never retire the PSK; a dry reserve runs frame-MAC rounds

[link]
backend = "sim"

[link.sim]
# the simulator derives Alice's preparation from this seed on both sides (a test convenience)
{sim_lines or "seed = 1"}

[post]
# cascade_variant = "{cascade.DEFAULT_VARIANT}"
# qber_threshold = 0.11
# eps_sec = 1e-9
# eps_cor = 1e-15
# key_block_bits = 256

[timeouts]
# handshake = 10.0
# round = 60.0
# idle = 600.0
# shutdown_grace = 5.0

[run]
max_rounds = {max_rounds}      # 0: run until stopped
window = {window}              # rounds in flight on one connection (the two sides use the smaller)

# [metrics]
# listen = "127.0.0.1:9770"     # Prometheus text format on http://HOST:PORT/metrics (off by default)
"""


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, str):  # a TOML basic string: JSON's escapes, and DEL escaped too
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)
