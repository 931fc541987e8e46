"""Prometheus metrics: what the daemon counts, and a small trio HTTP server for ``GET /metrics``.

Theory of operation
-------------------
* Off unless the config has ``[metrics] listen = "HOST:PORT"``. Each daemon has its own
  ``CollectorRegistry`` (never prometheus_client's global one), so two daemons in one process (the
  tests) keep their figures apart.
* Counters and histograms are fed as things happen (through :class:`~qkdd.monitor.Monitor` and, for the
  ETSI 014 API, :meth:`Metrics.etsi014_request`); the gauges read from the store (the key reserve, key
  delivery) are refreshed by the daemon right before each scrape, so a scrape always sees the store as
  it is.
* The exposition is prometheus_client's ``generate_latest`` (text format 0.0.4), served by h11 on a trio
  listener: one request per connection, a deadline per connection, only ``GET /metrics``. No threads,
  and nothing secret: counts, rates, error rates and durations only. :data:`NAMES` lists every metric
  name, for the Grafana dashboard's test.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import h11
import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from qkdd.config import Address
from qkdd.records import RoundSummary

log = logging.getLogger("qkdd")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CONNECTION_TIMEOUT = 10.0
"""Seconds a scraper has to send its request and take the answer."""
MAX_REQUEST = 16384
MAX_CONNECTIONS = 8
"""Scrapes served at once; a connection beyond them is closed at once (I5: whoever reaches the port
cannot make the daemon hold more)."""
REFRESH_SECONDS = 5.0
"""The gauges read from the store are read again at most this often, however often scrapes come."""
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300)
REQUEST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ETSI014_PATH = re.compile(r"/api/v1/keys/[^/?]+/(status|enc_keys|dec_keys)(?:\?.*)?")

Refresh = Callable[["Metrics"], Awaitable[None]]


class Metrics:
    """The metrics of one daemon, in their own registry."""

    def __init__(self, role: str, link_id: str) -> None:
        # no *_created series: they double what is scraped and say only when the daemon started
        # (a process-wide setting of prometheus_client; the daemon is its only user)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self.info = Gauge(
            "qkdd_info", "Always 1: this daemon's role and link", ["role", "link_id"], registry=r
        )
        self.info.labels(role, link_id).set(1)
        self.rounds = Counter(
            "qkdd_rounds",
            "Rounds ended, by outcome (Bob's pending rounds count once committed)",
            ["outcome"],
            registry=r,
        )
        for outcome in ("committed", "aborted"):
            self.rounds.labels(outcome)
        self.sifted = Counter(
            "qkdd_sifted_bytes", "Sifted key of the rounds ended, in bytes (bits / 8)", registry=r
        )
        self.disclosed = Counter(
            "qkdd_disclosed_bytes",
            "Disclosed in reconciliation and confirmation, in bytes (bits / 8)",
            registry=r,
        )
        self.secret = Counter(
            "qkdd_secret_bytes", "Secret key of committed rounds, in bytes (bits / 8)", registry=r
        )
        self.qber = Gauge("qkdd_qber", "The last round's quantum bit error rate (key basis)", registry=r)
        self.phase_error = Gauge(
            "qkdd_phase_error", "The last round's phase error rate (the X-basis bound)", registry=r
        )
        self.efficiency = Gauge(
            "qkdd_reconciliation_efficiency",
            "The last reconciled round's disclosed bits over n*h(QBER) (1 is the Shannon limit)",
            registry=r,
        )
        self.link_up = Gauge("qkdd_link_up", "1 while an authenticated connection runs the link", registry=r)
        self.link_paused = Gauge(
            "qkdd_link_paused", "1 while the link is paused (reserve, key store full, backoff)", registry=r
        )
        self.round_seconds = Histogram(
            "qkdd_round_duration_seconds",
            "A round's wall time at this side",
            registry=r,
            buckets=ROUND_BUCKETS,
        )
        self.stage_seconds = Histogram(
            "qkdd_round_stage_duration_seconds",
            "Wall time of a round in each engine state (waiting for the peer included)",
            ["stage"],
            registry=r,
            buckets=STAGE_BUCKETS,
        )
        self.reserve = Gauge("qkdd_reserve_bytes", "Unused key reserve, in bytes (bits / 8)", registry=r)
        self.psk_retired = Gauge("qkdd_psk_retired", "1 once the bootstrap PSK is retired", registry=r)
        self.available = Gauge(
            "qkdd_delivery_available_bytes",
            "Key of the delivery pool not yet handed out, in bytes",
            registry=r,
        )
        self.leased = Gauge(
            "qkdd_delivery_leased_bytes", "Alice: the unused key of her leases, in bytes", registry=r
        )
        self.waiting_keys = Gauge(
            "qkdd_delivery_waiting_keys", "Keys assigned here that a slave SAE has not fetched", registry=r
        )
        self.requests = Counter(
            "qkdd_etsi014_requests",
            "ETSI 014 API requests answered, by route and HTTP status",
            ["route", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "qkdd_etsi014_request_duration_seconds",
            "ETSI 014 API request latency, from the complete request to the answer sent, by route",
            ["route"],
            registry=r,
            buckets=REQUEST_BUCKETS,
        )

    def link(self, state: str) -> None:
        self.link_up.set(state == "up")
        self.link_paused.set(state == "paused")

    def round_ended(
        self,
        summary: RoundSummary,
        disposition: str,
        stages: Mapping[str, float],
        efficiency: float | None,
    ) -> None:
        if disposition == "aborted":
            self.rounds.labels("aborted").inc()
        self.sifted.inc(summary.sifted_bits / 8)
        self.disclosed.inc(summary.disclosed_bits / 8)
        if summary.qber is not None:
            self.qber.set(summary.qber)
        if summary.phase_error is not None:
            self.phase_error.set(summary.phase_error)
        if efficiency is not None:
            self.efficiency.set(efficiency)
        for stage, seconds in stages.items():
            self.stage_seconds.labels(stage.lower()).observe(seconds)
        if stages:
            self.round_seconds.observe(sum(stages.values()))

    def committed(self, secret_bits: int) -> None:
        self.rounds.labels("committed").inc()
        self.secret.inc(secret_bits / 8)

    def dropped(self) -> None:
        self.rounds.labels("aborted").inc()

    def store(self, figures: Mapping[str, Any]) -> None:
        """The gauges read from the store (:func:`qkdd.monitor.store_figures`)."""
        self.reserve.set(figures["reserve_bits"] / 8)
        self.psk_retired.set(figures["psk_retired"])
        self.available.set(figures["delivery_available_bits"] / 8)
        self.leased.set(figures["delivery_leased_bits"] / 8)
        self.waiting_keys.set(figures["delivery_waiting_keys"])

    def etsi014_request(self, target: str, status: int, seconds: float) -> None:
        """One answered ETSI 014 request: its target (path and query), HTTP status and latency. The route
        label is one of three names or ``other``: a client cannot grow the label set."""
        match = _ETSI014_PATH.fullmatch(target)
        route = match[1] if match else "other"
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


NAMES = (
    "qkdd_info",
    "qkdd_rounds_total",
    "qkdd_sifted_bytes_total",
    "qkdd_disclosed_bytes_total",
    "qkdd_secret_bytes_total",
    "qkdd_qber",
    "qkdd_phase_error",
    "qkdd_reconciliation_efficiency",
    "qkdd_link_up",
    "qkdd_link_paused",
    "qkdd_round_duration_seconds",
    "qkdd_round_stage_duration_seconds",
    "qkdd_reserve_bytes",
    "qkdd_psk_retired",
    "qkdd_delivery_available_bytes",
    "qkdd_delivery_leased_bytes",
    "qkdd_delivery_waiting_keys",
    "qkdd_etsi014_requests_total",
    "qkdd_etsi014_request_duration_seconds",
)
"""Every metric family the daemon exports, as exposed (counters with ``_total``; histograms also as
``_bucket``, ``_sum`` and ``_count``)."""


async def serve(
    metrics: Metrics,
    listen: Address,
    refresh: Refresh,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``GET /metrics`` on ``listen`` until cancelled; ``task_status`` gets the port (0 picks one).
    ``refresh(metrics)`` runs before an exposition when the last one is :data:`REFRESH_SECONDS` old."""
    listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    port = int(listeners[0].socket.getsockname()[1])
    log.info("Prometheus metrics on http://%s:%d/metrics", listen.host, port)
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    refreshed = -math.inf

    async def refresh_now(metrics: Metrics) -> None:
        nonlocal refreshed
        if trio.current_time() - refreshed >= REFRESH_SECONDS:
            refreshed = trio.current_time()
            try:
                await refresh(metrics)
            except Exception as error:  # a failing store: the scrape gets the gauges as they were
                log.warning("metrics: cannot read the store: %s: %s", type(error).__name__, error)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await _connection(stream, metrics, refresh_now)
        finally:
            limiter.release_on_behalf_of(stream)

    async def accept(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as error:  # out of file descriptors or memory: wait, as trio.serve_listeners does
                if error.errno not in _TRANSIENT:
                    raise
                log.warning("metrics: cannot accept a connection: %s", error.strerror)
                await trio.sleep(0.1)
                continue
            try:  # taken here, in the order connections arrive, so the first MAX_CONNECTIONS are served
                limiter.acquire_on_behalf_of_nowait(stream)
            except trio.WouldBlock:
                await stream.aclose()
                continue
            nursery.start_soon(handle, stream)

    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept, listener, nursery)
            task_status.started(port)
    finally:
        for listener in listeners:
            listener.socket.close()


async def _connection(stream: trio.SocketStream, metrics: Metrics, refresh: Refresh) -> None:
    try:
        await _answer(stream, metrics, refresh)
    finally:  # closed even when cancelled (aclose closes first, then raises)
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()


async def _answer(stream: trio.SocketStream, metrics: Metrics, refresh: Refresh) -> None:
    with trio.move_on_after(CONNECTION_TIMEOUT):
        try:
            connection = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
            request = await _read_request(stream, connection)
            if request is None:
                return
            status, headers, body = 200, [("content-type", CONTENT_TYPE)], b""
            if request.target.split(b"?", 1)[0] != b"/metrics":
                status, body = 404, b"only /metrics is served here\n"
            elif request.method not in (b"GET", b"HEAD"):
                status, body = 405, b"GET /metrics\n"
                headers.append(("allow", "GET, HEAD"))
            else:
                await refresh(metrics)
                body = metrics.exposition()
            if status != 200:
                headers[0] = ("content-type", "text/plain; charset=utf-8")
            headers += [("content-length", str(len(body))), ("connection", "close")]
            out = connection.send(h11.Response(status_code=status, headers=headers)) or b""
            if request.method != b"HEAD":
                out += connection.send(h11.Data(data=body)) or b""
            out += connection.send(h11.EndOfMessage()) or b""
            await stream.send_all(out)
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as error:
            log.debug("metrics connection ended: %s", type(error).__name__)


async def _read_request(stream: trio.SocketStream, connection: h11.Connection) -> h11.Request | None:
    """The request's head (its body, if any, is ignored: ``/metrics`` takes none)."""
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(MAX_REQUEST))
        elif isinstance(event, h11.Request):
            return event
        else:
            return None
