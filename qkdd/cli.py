"""The ``qkdd`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qkdd import __version__
from qkdd.errors import QkddError
from qkdd.stages.cascade import VARIANTS

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _milliseconds(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of milliseconds: {text!r}") from None
    if not values or any(not 0 <= v <= 10_000 for v in values):
        raise argparse.ArgumentTypeError("round-trip times must lie within 0..10000 ms")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qkdd", description="Quantum key distribution daemons and tools.")
    parser.add_argument("--version", action="version", version=f"qkdd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="run the benchmarks (Cascade, privacy amplification, e2e)")
    bench.add_argument(
        "what",
        nargs="?",
        choices=["stages", "e2e", "auth", "keyrate", "etsi014"],
        default="stages",
        help="stages (default): Cascade, amplification and authentication; e2e: two daemons over "
        "loopback; auth: the authentication figures alone; keyrate: the decoy bound's cost and accuracy; "
        "etsi014: keys per second and latency of the key delivery API",
    )
    bench.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    bench.add_argument(
        "--variant", action="append", choices=VARIANTS, help="Cascade variant(s) to run (default: all)"
    )
    bench.add_argument(
        "--frames", type=int, help="frames per (variant, QBER, size) cell, overriding defaults"
    )
    bench.add_argument("--rounds", type=int, default=6, help="e2e: rounds per run (default 6)")
    bench.add_argument("--pulses", type=int, help="e2e: pulses per frame (default: the demo's, 2^26)")
    bench.add_argument(
        "--window",
        type=int,
        help="e2e: the connection's window, the most rounds in flight (default: the most that --rounds can "
        "measure in steady state, (rounds - 1) / 2, at most run.window's default); Alice keeps fewer "
        "open on a short round trip",
    )
    bench.add_argument(
        "--rtt",
        type=_milliseconds,
        help="e2e: round-trip times in ms to add between Alice and Bob at 10 km, comma-separated "
        "(default 10,50; --quick: 10)",
    )

    conform = commands.add_parser(
        "conform", help="play one role of qkdp/1 against an implementation and check its requirements"
    )
    conform.add_argument(
        "--peer",
        required=True,
        help="HOST:PORT of the implementation under test (as alice: where it listens; as bob: where we "
        "listen for it)",
    )
    conform.add_argument(
        "--as", dest="role", choices=["alice", "bob"], required=True, help="the role we play"
    )
    conform.add_argument("--config", type=Path, required=True, help="our config: link, PSK, round parameters")
    conform.add_argument("--json", action="store_true", help="one JSON object per scenario")

    run = commands.add_parser("run", help="run a daemon in the foreground")
    run.add_argument("--config", type=Path, required=True, help="the TOML config file")
    run.add_argument("--rounds", type=int, help="stop after this many rounds (overrides run.max_rounds)")
    run.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="log messages of this severity and above (default INFO)",
    )

    init = commands.add_parser(
        "init",
        help="write a config file and, for PSK bootstrap, a fresh PSK (creating missing folders; "
        "nothing at all if a check fails)",
    )
    init.add_argument("--role", choices=["alice", "bob"], required=True)
    init.add_argument("--peer", help="HOST:PORT of Bob, for Alice to connect to (Bob needs none)")
    init.add_argument(
        "--listen",
        help="HOST:PORT to accept connections on (default for Bob: 0.0.0.0 at --peer's port, or at 7700 "
        "without --peer)",
    )
    init.add_argument("--state-dir", type=Path, required=True)
    init.add_argument("--link-id", default="qkdd-link")
    psk = init.add_mutually_exclusive_group()
    psk.add_argument("--psk-file", type=Path, help="an existing PSK file to use (copied from the other host)")
    psk.add_argument(
        "--psk-out", type=Path, help="where to write the fresh PSK file, mode 0600 (default: STATE_DIR/psk)"
    )
    init.add_argument("--config", type=Path, help="where to write the config (default: STATE_DIR/ROLE.toml)")
    init.add_argument(
        "--distance-km",
        type=float,
        help="the sim link's length: its intensities, their probabilities, the basis bias and the frame "
        "size come from qkdd keyrate's optimiser for it (needs scipy; the same on both hosts)",
    )

    demo = commands.add_parser("demo", help="Alice and Bob as two processes over 127.0.0.1")
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--distance-km", type=float, default=10.0)
    demo.add_argument(
        "--eve", type=float, default=0.0, metavar="FRACTION", help="intercept-resend on this fraction"
    )
    demo.add_argument(
        "--pulses",
        type=int,
        help="pulses per frame (default: the optimiser's for the distance, at least 2^26; the intensities, "
        "their probabilities and the basis bias are optimised for the distance either way)",
    )
    demo.add_argument("--state-dir", type=Path, help="keep the state here (default: a temporary folder)")
    demo.add_argument("--json", action="store_true")
    demo.add_argument(
        "--bootstrap",
        choices=["psk", "pki"],
        default="psk",
        help="first authentication: a PSK or a fresh PKI",
    )
    demo.add_argument(
        "--etsi014",
        action="store_true",
        help="also serve the ETSI 014 key delivery API at both sites (throwaway CA and SAE certificates), "
        "fetch a key with enc_keys at one site and dec_keys at the other, and compare",
    )

    keyrate = commands.add_parser("keyrate", help="expected secret key against distance (decoy-state bound)")
    keyrate.add_argument(
        "--distances", default="0:200:25", help="km: START:STOP:STEP or a list (default 0:200:25)"
    )
    keyrate.add_argument(
        "--block", type=int, default=10**6, help="key-basis detections per round (default 10^6)"
    )
    keyrate.add_argument("--json", action="store_true")
    keyrate.add_argument("--plot", type=Path, metavar="FILE.png", help="plot the curves (needs matplotlib)")
    keyrate.add_argument(
        "--optimize", action="store_true", help="best intensities, probabilities, basis bias"
    )
    keyrate.add_argument(
        "--params", type=Path, metavar="FILE.toml", help="link parameters (or a qkdd config)"
    )
    for name, kind in (
        ("fiber-loss-db-per-km", float),
        ("detector-efficiency", float),
        ("dark-count-probability", float),
        ("afterpulse-probability", float),
        ("misalignment", float),
        ("f-ec", float),
        ("clock-hz", float),
        ("z-probability", float),
        ("eps-sec", float),
        ("eps-cor", float),
    ):
        keyrate.add_argument(f"--{name}", type=kind)
    keyrate.add_argument("--intensities", type=lambda t: [float(v) for v in t.split(",")], help="mu1,mu2,mu3")
    keyrate.add_argument(
        "--intensity-probabilities", type=lambda t: [float(v) for v in t.split(",")], help="p1,p2,p3"
    )

    pki = commands.add_parser(
        "pki", help="CAs and certificates: PKI bootstrap nodes, ETSI 014 KMEs (servers) and SAEs (clients)"
    )
    pki_commands = pki.add_subparsers(dest="pki_command", required=True)
    init_ca = pki_commands.add_parser("init-ca", help="create a CA: OUT/ca.key (0600) and OUT/ca.crt")
    init_ca.add_argument("--out", type=Path, required=True)
    init_ca.add_argument(
        "--algorithm",
        choices=["ml-dsa-65", "ed25519", "ecdsa-p256"],
        default="ml-dsa-65",
        help="ecdsa-p256 for the CA of the ETSI 014 key delivery API (TLS)",
    )
    init_ca.add_argument("--days", type=int, default=3650)
    issue = pki_commands.add_parser("issue", help="issue a node certificate: OUT/NAME.crt and OUT/NAME.key")
    issue.add_argument("--name", required=True, help="the node's name (alice, bob, or a host name)")
    issue.add_argument("--ca", type=Path, required=True, help="the folder init-ca wrote")
    issue.add_argument("--out", type=Path, required=True)
    issue.add_argument("--algorithm", choices=["ml-dsa-65", "ed25519"], default="ml-dsa-65")
    issue.add_argument("--days", type=int, default=825)
    sae = pki_commands.add_parser(
        "issue-sae", help="issue an SAE's TLS client certificate for the ETSI 014 API: OUT/NAME.crt, .key"
    )
    kme = pki_commands.add_parser(
        "issue-kme", help="issue a KME's TLS server certificate for the ETSI 014 API: OUT/NAME.crt, .key"
    )
    for tls in (sae, kme):
        tls.add_argument("--name", required=True, help="the certificate's common name (an SAE ID for SAEs)")
        tls.add_argument(
            "--ca", type=Path, required=True, help="a folder init-ca --algorithm ecdsa-p256 wrote"
        )
        tls.add_argument("--out", type=Path, required=True)
        tls.add_argument("--algorithm", choices=["ecdsa-p256", "ed25519"], default="ecdsa-p256")
        tls.add_argument("--days", type=int, default=825)
    kme.add_argument(
        "--host", action="append", required=True, help="a DNS name or IP address clients use (repeatable)"
    )

    check = commands.add_parser(
        "check", help="check a config and the host before running it: one line per check, exit 0 if all pass"
    )
    check.add_argument("--config", type=Path, required=True)
    check.add_argument("--json", action="store_true")

    plot = commands.add_parser(
        "plot", help="a link's history (error rates, key per round, reserve) from its key store, as a figure"
    )
    plot.add_argument("--state-dir", type=Path, required=True)
    plot.add_argument("--out", type=Path, help="the figure's file (default: qkdd-LINK_ID.png here)")

    status = commands.add_parser(
        "status",
        help="ask the running daemon (its control socket in the state directory): link, reason, uptime, "
        "key rate, last QBER, reserve, key delivery; or say since when none runs",
    )
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path)
    where.add_argument("--state-dir", type=Path)
    status.add_argument("--json", action="store_true", help='one JSON object (errors too: {"error": ...})')
    status.add_argument("--watch", action="store_true", help="ask again every --interval seconds until ^C")
    status.add_argument(
        "--interval", default="2", metavar="SECONDS", help="--watch: seconds between reports (default 2)"
    )

    keys = commands.add_parser("keys", help="key store tools")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    export = keys_commands.add_parser("export", help="print stored keys as JSON lines (operators only)")
    export.add_argument("--state-dir", type=Path, required=True)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "bench", "demo"):
        from qkdd.memory import keep_freed_memory  # noqa: PLC0415

        keep_freed_memory()
    try:
        return _dispatch(args)
    except QkddError as error:
        print(f"qkdd {args.command}: {error}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    # imports inside the branches keep `qkdd --help` fast
    if args.command == "bench":
        if args.frames is not None and args.frames < 1:
            print("qkdd bench: --frames must be at least 1", file=sys.stderr)
            return 2
        if args.what == "e2e":
            from qkdd import config, demo  # noqa: PLC0415

            # by default the deepest pipeline a run this long measures full (see demo.steady_rounds)
            deepest = max(1, min(config.DEFAULT_WINDOW, (args.rounds - 1) // 2))
            window = deepest if args.window is None else args.window
            if not 1 <= window <= config.MAX_WINDOW:
                print(f"qkdd bench: --window must lie in [1, {config.MAX_WINDOW}]", file=sys.stderr)
                return 2
            return demo.bench_e2e(args.quick, args.json, args.rounds, args.rtt, args.pulses, window)
        if args.what == "etsi014":
            from qkdd.delivery import demo as delivery_demo  # noqa: PLC0415

            return delivery_demo.bench(args.quick, args.json)
        if args.what == "auth":
            from qkdd import bench  # noqa: PLC0415

            return bench.main_auth(args.quick, args.json)
        if args.what == "keyrate":
            from qkdd import bench  # noqa: PLC0415

            return bench.main_keyrate(args.quick, args.json)
        from qkdd import bench  # noqa: PLC0415

        quick = ["parallel", "fast", "optimized", "original"]
        variants = args.variant or (quick if args.quick else list(VARIANTS))
        return bench.main(args.quick, args.json, variants, args.frames)
    if args.command == "conform":
        from qkdd import config, conform  # noqa: PLC0415

        peer = config.parse_address(args.peer, "--peer")
        return conform.main(config.load(args.config), args.role, (peer.host, peer.port), args.json)
    if args.command == "run":
        from qkdd import config, daemon  # noqa: PLC0415

        loaded = config.load(args.config)
        if args.rounds is not None:
            loaded = config.Config(**{**loaded.__dict__, "max_rounds": args.rounds})
        return daemon.main_run(loaded, args.log_level)
    if args.command == "init":
        from qkdd import admin  # noqa: PLC0415

        return admin.init(args)
    if args.command == "demo":
        from qkdd import demo  # noqa: PLC0415

        if args.etsi014:
            from qkdd.delivery import demo as delivery_demo  # noqa: PLC0415

            sim = {**demo.link_options(args.distance_km, args.pulses), "eve_fraction": args.eve}
            return delivery_demo.run(args.state_dir, sim, args.json)
        return demo.main(args)
    if args.command == "plot":
        from qkdd import plot  # noqa: PLC0415

        return plot.run(args)
    if args.command == "check":
        from qkdd import check  # noqa: PLC0415

        return check.run(args)
    if args.command == "status":
        from qkdd import admin  # noqa: PLC0415

        return admin.status(args)
    if args.command == "keyrate":
        from qkdd import keyrate  # noqa: PLC0415

        if args.block < 1:
            raise QkddError("--block must be at least 1")
        names = list(keyrate.LinkModel.__dataclass_fields__)
        model = keyrate.load_model(args.params, {name: getattr(args, name, None) for name in names})
        results = keyrate.run(
            model, keyrate.parse_distances(args.distances), args.block, optimize_each=args.optimize
        )
        print(keyrate.report(results, model, args.block, args.json))
        if args.plot is not None:
            keyrate.plot([r for r, _ in results], args.plot)
        return 0
    if args.command == "pki":
        from qkdd.auth import pki  # noqa: PLC0415

        if args.days < 1:
            raise QkddError("--days must be at least 1")
        if args.pki_command == "init-ca":
            written = pki.init_ca(args.out, algorithm=args.algorithm, days=args.days)
        else:
            usage = {"issue-sae": "client", "issue-kme": "server"}.get(args.pki_command)
            written = pki.issue(
                args.name,
                args.ca,
                args.out,
                algorithm=args.algorithm,
                days=args.days,
                usage=usage,
                hosts=tuple(getattr(args, "host", None) or ()),
            )
        print(f"wrote {written} and its key (mode 0600)")
        return 0
    if args.command == "keys":
        from qkdd import admin  # noqa: PLC0415

        return admin.export_keys(args.state_dir)
    return 2


if __name__ == "__main__":
    sys.exit(main())
