"""Operator commands: ``qkdd init``, ``qkdd status``, ``qkdd keys export``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from qkdd import config as config_mod
from qkdd.auth.psk import generate_psk, read_psk, write_psk
from qkdd.errors import InputError
from qkdd.store import DATABASE, KeyStore

STATUS_FILE = "status.json"


def init(args: argparse.Namespace) -> int:
    """Write a config for one role and, unless one is given, a fresh PSK file (0600)."""
    peer = config_mod.parse_address(args.peer, "--peer")
    state_dir: Path = args.state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    listen = args.listen
    if args.role == "bob" and listen is None:
        listen = f"0.0.0.0:{peer.port}"
    if listen is not None:
        config_mod.parse_address(listen, "--listen")
    if args.psk_file is not None:
        psk_path = args.psk_file.resolve()
        read_psk(psk_path)  # fail now, not when the daemon starts
    else:
        psk_path = state_dir / "psk"
        if psk_path.exists():
            raise InputError(f"{psk_path} exists; pass --psk-file {psk_path} to use it")
        write_psk(psk_path, generate_psk())
    target: Path = args.config or state_dir / f"{args.role}.toml"
    if target.exists():
        raise InputError(f"{target} exists; not overwriting it")
    sim = None
    distance = getattr(args, "distance_km", None)
    if distance is not None:
        from qkdd import keyrate  # noqa: PLC0415 - scipy, only when asked

        if not 0 <= distance < math.inf:
            raise InputError(f"--distance-km: expected a finite number >= 0, got {distance}")
        settings = keyrate.sim_settings(distance)
        sim = settings.sim_options(distance)
    text = config_mod.render(
        args.role,
        link_id=args.link_id,
        state_dir=str(state_dir),
        psk_file=str(psk_path),
        listen=listen,
        peer=None if listen else args.peer,
        sim=sim,
    )
    target.write_text(text)
    config_mod.load(target)  # what we wrote must load
    print(f"wrote {target}")
    if sim is not None:
        chosen = ", ".join(f"{k} = {v}" for k, v in sim.items())
        print(f"link.sim for {distance} km (the other host's init computes the same): {chosen}")
        frame_key = settings.key_per_pulse * settings.pulses_per_frame
        if frame_key > 0:
            print(f"expected secret key: {frame_key:.0f} bits per frame (qkdd keyrate's model)")
        else:
            print(f"no secret key expected at {distance} km, not even from the simulator's longest frames")
    if args.psk_file is None:
        print(
            f"wrote {psk_path} (mode 0600): copy it to the other host over a secure channel, then run there"
        )
        print(f"  qkdd init --role {'bob' if args.role == 'alice' else 'alice'} ... --psk-file PATH")
    return 0


def _state_dir(args: argparse.Namespace) -> tuple[Path, str | None]:
    if args.config is not None:
        loaded = config_mod.load(args.config)
        return loaded.state_dir, loaded.link_id
    return Path(args.state_dir), None


def read_status_file(state_dir: Path) -> dict[str, object]:
    try:
        value = json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def status(args: argparse.Namespace) -> int:
    state_dir, link_id = _state_dir(args)
    if not (state_dir / DATABASE).exists():
        raise InputError(f"no key store in {state_dir}")
    store = KeyStore(state_dir, link_id, create=False)
    try:
        stats = store.statistics()
        daemon = read_status_file(state_dir)
        last = stats.last_round or {}
        report = {
            "link_id": store.link_id,
            "state_dir": str(state_dir),
            "link": daemon.get("link", "unknown"),
            "peer": daemon.get("peer"),
            "role": daemon.get("role"),
            "status_updated": daemon.get("updated"),
            "rounds": stats.rounds,
            "committed_rounds": stats.committed_rounds,
            "aborted_rounds": stats.aborted_rounds,
            "pending_rounds": stats.pending_rounds,
            "next_round": store.next_round,
            "last_round": last.get("round"),
            "last_round_state": last.get("state"),
            "last_qber": last.get("qber"),
            "last_phase_error": last.get("phase_error"),
            "last_reason": last.get("reason"),
            "auth": last.get("auth"),
            "stored_keys": stats.stored_keys,
            "stored_key_bits": stats.stored_key_bits,
            "reserve_total_bits": store.reserve.total_bits,
            "reserve_available_bits": store.reserve.status().available_bits,
            "psk_retired": store.psk_retired,
            "epoch": store.epoch,  # qkdp/1's restore detector, kept as it was; qkdp/2 uses handshake_keys
            "handshake_keys": store.reserve.handshake_keys().positions(),
        }
        # ETSI 014 key delivery (§19): Bob's free pool, Alice's leases, keys waiting for their slave SAEs,
        # and the assignments of both sites' logs that this site holds
        ledger = store.ledger(str(daemon.get("role") or "alice"))
        report["delivery_available_bits"] = 8 * ledger.available_bytes()
        report["delivery_leased_bits"] = 8 * ledger.lease_bytes()
        report["delivery_waiting_keys"] = ledger.waiting_keys()
        report["delivery_assignments"] = ledger.assignments()
    finally:
        store.close()
    if args.json:
        print(json.dumps(report))
        return 0
    for name, value in report.items():
        shown = value
        if isinstance(value, float) and name == "status_updated":
            shown = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
        print(f"{name:>18}: {shown if shown is not None else '-'}")
    return 0


def export_keys(state_dir: Path) -> int:
    if not (state_dir / DATABASE).exists():
        raise InputError(f"no key store in {state_dir}")
    print(
        "qkdd keys export: these are secret keys; anyone who sees this output can read what they protect",
        file=sys.stderr,
    )
    store = KeyStore(state_dir, None, create=False)
    try:
        for key_id, key in store.committed_keys():
            sys.stdout.write(json.dumps({"key_id": key_id, "key_hex": key.hex()}) + "\n")
    finally:
        store.close()
    return 0


def write_status_file(state_dir: Path, **fields: object) -> None:
    """The daemon's view of the link, for ``qkdd status`` (atomic replace; no secrets)."""
    path = state_dir / STATUS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({**fields, "updated": time.time(), "pid": os.getpid()}))
    temporary.replace(path)
