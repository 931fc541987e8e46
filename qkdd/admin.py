"""Operator commands: ``qkdd init``, ``qkdd status``, ``qkdd keys export``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from qkdd import config as config_mod
from qkdd import control, monitor, statelock
from qkdd.auth.psk import generate_psk, read_psk, write_psk
from qkdd.errors import InputError, QkddError
from qkdd.store import DATABASE, KeyStore

STATUS_FILE = "status.json"


@dataclass(frozen=True)
class _InitPlan:
    """What ``qkdd init`` will write, decided (and every path checked) before anything is written."""

    config: Path
    text: str
    state_dir: Path
    psk: Path
    fresh_psk: bool  # False: an existing PSK file (--psk-file), read and checked, not written
    notes: tuple[str, ...]  # what --distance-km chose, printed once the files are written


def init(args: argparse.Namespace) -> int:
    """Write a config for one role and, unless ``--psk-file`` names one, a fresh PSK file (0600).

    Every input and path is checked first; only then are the missing folders created and the files
    written, so a failed ``init`` leaves nothing behind (a write that fails part-way is undone).

    Raises:
        InputError: a bad argument, a file that exists, a folder that cannot be created.
    """
    try:
        plan = _plan_init(args)
    except OSError as error:  # stat() inside a folder we may not enter
        raise InputError(f"cannot check {error.filename}: {error.strerror}; nothing written") from None
    _write_init(plan)
    print(f"wrote {plan.config}")
    for note in plan.notes:
        print(note)
    if plan.fresh_psk:
        print(
            f"wrote {plan.psk} (mode 0600): copy it to the other host over a secure channel, then run there"
        )
        print(f"  qkdd init --role {'bob' if args.role == 'alice' else 'alice'} ... --psk-file PATH")
    return 0


def _plan_init(args: argparse.Namespace) -> _InitPlan:
    peer = config_mod.parse_address(args.peer, "--peer") if args.peer is not None else None
    listen = args.listen
    if listen is not None:
        config_mod.parse_address(listen, "--listen")
    elif args.role == "bob":
        listen = f"0.0.0.0:{peer.port if peer is not None else config_mod.DEFAULT_PORT}"
    elif peer is None:
        raise InputError("--peer: Alice connects to Bob, so give his HOST:PORT (or --listen to accept)")
    if not 0 < len(args.link_id.encode()) <= 128:
        raise InputError(f"--link-id: expected 1 to 128 bytes, got {len(args.link_id.encode())}")
    sim = None
    notes: list[str] = []
    distance = args.distance_km
    if distance is not None:
        if not 0 <= distance < math.inf:
            raise InputError(f"--distance-km: expected a finite number >= 0, got {distance}")
        from qkdd import keyrate  # noqa: PLC0415 - scipy, only when asked

        settings = keyrate.sim_settings(distance)
        sim = settings.sim_options(distance)
        chosen = ", ".join(f"{k} = {v}" for k, v in sim.items())
        notes.append(f"link.sim for {distance} km (the other host's init computes the same): {chosen}")
        frame_key = settings.key_per_pulse * settings.pulses_per_frame
        if frame_key > 0:
            notes.append(f"expected secret key: {frame_key:.0f} bits per frame (qkdd keyrate's model)")
        else:
            notes.append(
                f"no secret key expected at {distance} km, not even from the simulator's longest frames"
            )

    state_dir: Path = args.state_dir.resolve()
    _check_can_create(state_dir, "--state-dir", write_in=False)  # the daemon writes there, maybe not us
    if args.psk_file is not None:
        psk = args.psk_file.resolve()
        try:
            read_psk(psk)  # fail now, not when the daemon starts
        except InputError as error:
            raise InputError(str(error).replace("auth.psk_file:", "--psk-file:", 1)) from None
    else:
        psk = (args.psk_out or state_dir / "psk").resolve()
        if psk.exists():
            raise InputError(f"{psk} exists; pass --psk-file {psk} to use it, or another --psk-out")
        _check_can_create(psk.parent, "--psk-out" if args.psk_out else "--state-dir")
    target: Path = (args.config or state_dir / f"{args.role}.toml").resolve()
    if target.exists():
        raise InputError(f"{target} exists; not overwriting it")
    if target == psk:
        raise InputError(f"--config and the PSK file are the same path: {target}")
    _check_can_create(target.parent, "--config" if args.config else "--state-dir")

    text = config_mod.render(
        args.role,
        link_id=args.link_id,
        state_dir=str(state_dir),
        psk_file=str(psk),
        listen=listen,
        peer=None if listen else str(peer),
        sim=sim,
    )
    try:  # what we write must load: check it before writing it
        config_mod.from_mapping(tomllib.loads(text), target.parent)
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"the config would not be valid TOML ({error}); check --link-id") from None
    return _InitPlan(target, text, state_dir, psk, args.psk_file is None, tuple(notes))


def _check_can_create(folder: Path, option: str, *, write_in: bool = True) -> None:
    """Raise unless ``folder`` is a folder (we may write in, if ``write_in``) or can be created with its
    missing parents."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option}: {existing} is not a folder")
    if existing != folder and not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{option}: cannot create {folder}: no write permission in {existing}")
    if existing == folder and write_in and not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{option}: cannot write in {folder}: no write permission")


def _write_init(plan: _InitPlan) -> None:
    """Create the missing folders, then the PSK and the config; undo all of it if a write fails."""
    created: list[Path] = []
    current = plan.state_dir
    try:
        for folder in (plan.state_dir, plan.psk.parent, plan.config.parent):
            for current in reversed([p for p in (folder, *folder.parents) if not p.exists()]):
                current.mkdir(mode=0o700 if current == plan.state_dir else 0o755)
                created.append(current)
        if plan.fresh_psk:
            current = plan.psk
            write_psk(current, generate_psk())
            created.append(current)
        current = plan.config
        fd = os.open(current, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        created.append(current)
        with os.fdopen(fd, "w") as f:
            f.write(plan.text)
    except OSError as error:
        if current == plan.psk and plan.psk not in created and not isinstance(error, FileExistsError):
            created.append(current)  # write_psk created it (O_EXCL), then failed writing it
        for path in reversed(created):
            with contextlib.suppress(OSError):
                if path.is_dir():
                    path.rmdir()
                else:
                    path.unlink()
        raise InputError(f"cannot write {current}: {error.strerror}; nothing written") from None


def _state_dir(args: argparse.Namespace) -> tuple[Path, str | None, str | None]:
    """The state directory, link ID and role that ``--config`` or ``--state-dir`` name."""
    if args.config is not None:
        loaded = config_mod.load(args.config)
        return loaded.state_dir, loaded.link_id, loaded.role
    return Path(args.state_dir), None, None


def read_status_file(state_dir: Path) -> dict[str, object]:
    try:
        value = json.loads((state_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def status(args: argparse.Namespace) -> int:
    """``qkdd status [--json] [--watch [--interval S]]``: ask the daemon on its control socket, or say
    that none runs (since when) with the figures of its store. Every error under ``--json`` is a JSON
    object with ``error``. Exit 0 with a report (running or not), 1 when a daemon holds the state
    directory but does not answer, 2 on bad input."""
    try:
        interval = _interval(args.interval) if args.watch else 0.0
        state_dir, link_id, role = _state_dir(args)
    except QkddError as error:
        _show({"error": str(error)}, args.json)
        return 2
    if not args.watch:
        report, code = status_report(state_dir, link_id, role)
        _show(report, args.json)
        return code
    try:
        while True:
            report, code = status_report(state_dir, link_id, role)
            if not args.json:
                print(f"--- {monitor.iso(time.time())}")
            _show(report, args.json)
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.1 <= value <= 86400:
        raise InputError(f"--interval: expected seconds in [0.1, 86400], got {text!r}")
    return value


def status_report(state_dir: Path, link_id: str | None, role: str | None) -> tuple[dict[str, object], int]:
    """The report of ``qkdd status`` and its exit status (see :func:`status`)."""
    try:
        answer = control.ask(state_dir)
    except PermissionError:
        return {
            "error": f"no permission to reach {state_dir / control.SOCKET_FILE}: ask as the daemon's user "
            "or root (e.g. sudo -u qkdd qkdd status ...)"
        }, 2
    except control.ControlError as error:
        return {"running": True, "pid": statelock.holder(state_dir), "error": str(error)}, 1
    if answer is not None:
        return answer, (1 if "error" in answer else 0)
    holder = statelock.holder(state_dir)
    if holder is not None:
        return {
            "running": True,
            "pid": holder,
            "error": f"qkdd (pid {holder}) holds {state_dir} but nothing answers on its control socket "
            "(starting, or stuck)",
        }, 1
    if not (state_dir / DATABASE).exists():
        return {"running": False, "error": f"no key store in {state_dir}: no qkdd ever ran there"}, 2
    try:
        store = KeyStore(state_dir, link_id, create=False)
    except InputError as error:
        return {"running": False, "error": str(error)}, 2
    try:
        stop = read_status_file(state_dir)
        role = role or str(stop.get("role") or "alice")
        figures = monitor.store_figures(store, role)
    finally:
        store.close()
    return {**_stopped(state_dir, stop), "role": role, "state_dir": str(state_dir), **figures}, 0


def _stopped(state_dir: Path, stop: dict[str, object]) -> dict[str, object]:
    """Since when no daemon runs: when the last one stopped, if it stopped cleanly (it wrote
    ``status.json`` after its lock file); else the last sign of life in the state directory."""
    lock = state_dir / statelock.LOCK_FILE
    try:
        pid: int | None = int(lock.read_text(encoding="ascii").strip())
        started = lock.stat().st_mtime
    except (OSError, ValueError):
        pid, started = None, None
    stopped_at = stop.get("updated")
    clean = (
        isinstance(stopped_at, float)
        and stop.get("pid") == pid
        and (started is None or stopped_at >= started)
    )
    if clean:
        since: float | None = float(stopped_at)  # type: ignore[arg-type]
    else:
        seen = []
        for name in (DATABASE, f"{DATABASE}-wal", statelock.LOCK_FILE):
            with contextlib.suppress(OSError):
                seen.append((state_dir / name).stat().st_mtime)
        since = max(seen, default=None)
    return {
        "running": False,
        "pid": pid,
        "since": monitor.iso(since),
        "stopped_cleanly": bool(clean),
        "stop_reason": stop.get("reason") if clean else None,
    }


_PERCENT = ("last_qber", "last_phase_error")


def _show(report: dict[str, object], as_json: bool) -> None:
    """Print a report: one JSON object, or one ``name: value`` line per field (the same fields), errors
    on stderr."""
    if as_json:
        print(json.dumps(report))
        return
    if report.get("running") is False and "error" not in report:
        how = (
            "stopped cleanly"
            if report.get("stopped_cleanly")
            else "last sign of life; it did not stop cleanly"
        )
        print(f"not running since {report.get('since') or '(unknown)'} ({how})")
    if "error" in report:
        print(f"qkdd status: {report['error']}", file=sys.stderr)
    for name, value in report.items():
        if name == "error":
            continue
        if value is None or value == []:
            shown = "-"
        elif isinstance(value, bool):
            shown = "yes" if value else "no"
        elif name in _PERCENT and isinstance(value, float):
            shown = f"{100 * value:.2f}%"
        elif isinstance(value, list):
            shown = ", ".join(str(v) for v in value)
        else:
            shown = str(value)
        print(f"{name:>26}: {shown}")


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
    """When and why the daemon stopped, written as it stops cleanly, for ``qkdd status`` once it is
    gone (atomic replace; no secrets)."""
    path = state_dir / STATUS_FILE
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({**fields, "updated": time.time(), "pid": os.getpid()}))
    temporary.replace(path)
