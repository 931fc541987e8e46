"""``qkdd check --config FILE``: everything a daemon needs from its host, checked before it runs.

One line per check, ``ok`` or ``FAIL`` and what was found; exit 0 only if every check passes. The checks
read and probe, and never write: the config as ``qkdd run`` reads it (the link backend's options
included), the PSK file's mode and owner and its fingerprint (to compare with the other host's), the
state directory (writable, no daemon holding it, the key store's link), the certificates (readable, in
their validity period), the listening addresses (free to bind), and whether the peer answers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pwd
import socket
import sqlite3
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography import x509

from qkdd import config as config_mod
from qkdd import statelock
from qkdd.auth.psk import fingerprint, read_psk
from qkdd.errors import QkddError, operational_problem

PEER_TIMEOUT = 3.0
"""Seconds ``qkdd check`` waits for the peer to accept a connection."""
EXPIRY_WARNING_DAYS = 30
"""A certificate that expires sooner still passes, with a warning in its line."""


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def run(args: argparse.Namespace) -> int:
    """``qkdd check``."""
    checks = list(checks_for(args.config))
    if args.json:
        print(json.dumps({"ok": all(c.ok for c in checks), "checks": [asdict(c) for c in checks]}))
    else:
        for each in checks:
            print(f"{'ok  ' if each.ok else 'FAIL'}  {each.name}: {each.detail}")
    return 0 if all(c.ok for c in checks) else 1


def checks_for(path: Path) -> Iterator[Check]:
    """Every check of the config at ``path``, in order; nothing more once the config itself fails."""
    try:
        config = config_mod.load(path)
    except QkddError as error:
        yield Check("config", False, str(error))
        return
    yield Check("config", True, f"{path}: {config.role} of link {config.link_id!r}")
    yield _link(config)
    if config.psk_file is not None:
        yield _psk(config.psk_file, config.state_dir)
    held_by = statelock.holder(config.state_dir)
    yield from _state_dir(config.state_dir, config.link_id, held_by)
    for name, certificate, key, ca in _certificates(config):
        yield _certificate(name, certificate, key, ca)
    if held_by is None:  # a running daemon holds its ports; bind only when none runs
        if config.listen is not None:
            yield _bindable("network.listen", config.listen)
        if config.etsi014 is not None and config.etsi014.listen is not None:
            yield _bindable("etsi014.listen", config.etsi014.listen)
        if config.metrics is not None:
            yield _bindable("metrics.listen", config.metrics)
    if config.etsi014 is not None and config.etsi014.unix_socket is not None:
        yield _socket_folder(config.etsi014.unix_socket, config.state_dir)
    yield _peer(config)


def _link(config: config_mod.Config) -> Check:
    from qkdd.links import open_link  # noqa: PLC0415 - loads the backend

    try:
        link = open_link(config.link_backend, config.role, config.link_options)
    except QkddError as error:
        return Check("link", False, str(error))
    with contextlib.suppress(Exception):
        getattr(link, "close", lambda: None)()
    return Check("link", True, f"backend {config.link_backend!r}, its options accepted")


def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _psk(path: Path, state_dir: Path) -> Check:
    try:
        psk = read_psk(path)  # checks that no one else may read it
        owner = path.stat().st_uid
    except (QkddError, OSError) as error:
        return Check("auth.psk_file", False, str(error))
    # the daemon runs as the state directory's owner (or, before its first run, as whoever runs this)
    try:
        daemon_user = state_dir.stat().st_uid
    except OSError:
        daemon_user = os.geteuid()
    if owner != daemon_user:
        return Check(
            "auth.psk_file",
            False,
            f"{path} is owned by {_owner(owner)}, the daemon runs as {_owner(daemon_user)}: chown it",
        )
    return Check(
        "auth.psk_file", True, f"{path}: mode 0600, owner {_owner(owner)}, PSK fingerprint {fingerprint(psk)}"
    )


def _state_dir(state_dir: Path, link_id: str, held_by: int | None) -> Iterator[Check]:
    if state_dir.exists():
        if not state_dir.is_dir():
            yield Check("state_dir", False, f"{state_dir} is not a directory")
            return
        if not os.access(state_dir, os.W_OK | os.X_OK):
            yield Check("state_dir", False, f"{state_dir}: this user may not write in it")
            return
        mode = stat.S_IMODE(state_dir.stat().st_mode)
        if mode & 0o077:
            yield Check(
                "state_dir", False, f"{state_dir} has mode {mode:04o}: chmod 700 it (keys live there)"
            )
            return
    else:
        parent = next(p for p in state_dir.parents if p.exists())
        if not os.access(parent, os.W_OK | os.X_OK):
            yield Check(
                "state_dir", False, f"{state_dir} is missing and this user may not create it in {parent}"
            )
            return
        yield Check("state_dir", True, f"{state_dir} is missing; qkdd run creates it")
        return
    if held_by is not None:
        yield Check("state_dir", False, f"another qkdd (pid {held_by}) runs on {state_dir}")
    else:
        yield Check("state_dir", True, f"{state_dir}: writable, no qkdd runs on it")
    yield _key_store(state_dir, link_id)


def _key_store(state_dir: Path, link_id: str) -> Check:
    from qkdd.store import DATABASE, read_only  # noqa: PLC0415

    path = state_dir / DATABASE
    if not path.exists():
        return Check("key store", True, f"{path} is missing; qkdd run creates it (a new link)")
    try:
        with read_only(state_dir) as db:
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
            committed = db.execute("SELECT COUNT(*) FROM rounds WHERE state = 'committed'").fetchone()[0]
    except sqlite3.Error as error:
        return Check("key store", False, f"{path}: {operational_problem(error) or error}")
    stored = meta.get("link_id")
    if stored != link_id:
        return Check("key store", False, f"{path} belongs to link {stored!r}, the config says {link_id!r}")
    retired = "retired" if meta.get("psk_retired") == "1" else "in use"
    return Check("key store", True, f"link {link_id!r}, {committed} rounds committed, the PSK {retired}")


def _certificates(config: config_mod.Config) -> Iterator[tuple[str, Path, Path, Path]]:
    if config.pki is not None:
        yield "auth (pki)", config.pki.certificate, config.pki.key, config.pki.ca
    api = config.etsi014
    if api is not None and api.certificate is not None and api.key is not None and api.ca is not None:
        yield "etsi014", api.certificate, api.key, api.ca


def _certificate(name: str, certificate: Path, key: Path, ca: Path) -> Check:
    now = datetime.datetime.now(datetime.UTC)
    said = []
    for what, path in (("certificate", certificate), ("CA", ca)):
        try:
            loaded = x509.load_pem_x509_certificate(path.read_bytes())
        except OSError as error:
            return Check(name, False, f"{what} {path}: cannot read: {error.strerror}")
        except ValueError:
            return Check(name, False, f"{what} {path}: not a PEM certificate")
        if loaded.not_valid_before_utc > now:
            return Check(
                name, False, f"{what} {path} is valid only from {loaded.not_valid_before_utc:%Y-%m-%d}"
            )
        if loaded.not_valid_after_utc <= now:
            return Check(name, False, f"{what} {path} expired on {loaded.not_valid_after_utc:%Y-%m-%d}")
        days = (loaded.not_valid_after_utc - now).days
        said.append(f"{what} valid until {loaded.not_valid_after_utc:%Y-%m-%d}")
        if days < EXPIRY_WARNING_DAYS:
            said[-1] += f" (WARNING: {days} days left)"
    try:
        mode = stat.S_IMODE(key.stat().st_mode)
        key.read_bytes()
    except OSError as error:
        return Check(name, False, f"key {key}: cannot read: {error.strerror}")
    if mode & 0o077:
        return Check(name, False, f"key {key} has mode {mode:04o}: chmod 600 it")
    return Check(name, True, f"{certificate}: {', '.join(said)}; key readable, mode {mode:04o}")


def _bindable(name: str, address: config_mod.Address) -> Check:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address.host, address.port))
        except OSError as error:
            return Check(name, False, f"{address}: {operational_problem(error) or error}")
    return Check(name, True, f"{address} is free to listen on")


def _socket_folder(path: Path, state_dir: Path) -> Check:
    """The Unix socket's folder must let the daemon create the socket (the state directory is created)."""
    folder = path.parent
    if folder == state_dir and not folder.exists():
        return Check("etsi014.unix_socket", True, f"{path}: in the state directory, which qkdd run creates")
    if not os.access(folder, os.W_OK | os.X_OK):
        return Check("etsi014.unix_socket", False, f"{path}: this user may not create it in {folder}")
    if path.exists() and not stat.S_ISSOCK(path.lstat().st_mode):
        return Check("etsi014.unix_socket", False, f"{path} exists and is not a socket; qkdd run stops on it")
    return Check("etsi014.unix_socket", True, f"{path}: its folder is writable")


def _peer(config: config_mod.Config) -> Check:
    if config.role == "bob" or config.peer is None:
        return Check("peer", True, "Alice connects to this side: run qkdd check on her host to reach it")
    from qkdd.daemon import connect_failure  # noqa: PLC0415

    try:
        with socket.create_connection((config.peer.host, config.peer.port), timeout=PEER_TIMEOUT):
            pass
    except TimeoutError:
        return Check(
            "peer", False, f"{config.peer}: no answer in {PEER_TIMEOUT:g} s (host down, or a firewall)"
        )
    except OSError as error:
        return Check("peer", False, f"{config.peer}: {connect_failure(error)}")
    return Check("peer", True, f"{config.peer} accepts connections")
