"""Counters shared by a program's threads, the periodic stats line and Prometheus metrics."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final, cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from facepipe.config import Network

log = logging.getLogger(__name__)


class Counters:
    """Named monotonic counters plus gauges, safe to update from any thread."""

    def __init__(
        self, names: Iterable[str], gauges: Iterable[str] = (), unknown: Iterable[str] = ()
    ) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)
        self._gauges: dict[str, float] = dict.fromkeys(gauges, 0.0)
        # Figures another program counts (set_total / set_gauge): left out of the stats line and
        # the metrics until first known, so a restart never shows a false 0 (a reset, then a jump).
        self._unknown: set[str] = set(unknown)

    def inc(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def set_total(self, name: str, value: int) -> None:
        """Set a counter that another program counts (e.g. the broker's drops since it started)."""
        with self._lock:
            self._values[name] = value
            self._unknown.discard(name)

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value
            self._unknown.discard(name)

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in self._values.items() if k not in self._unknown}

    def gauges(self) -> dict[str, float]:
        with self._lock:
            return {k: v for k, v in self._gauges.items() if k not in self._unknown}


class _Collector(Collector):
    def __init__(self, prefix: str, counters: Counters) -> None:
        self.prefix = prefix
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, value in self.counters.snapshot().items():
            yield CounterMetricFamily(f"{self.prefix}_{name}", f"{name} so far", value=value)
        for name, gauge in self.counters.gauges().items():
            yield GaugeMetricFamily(f"{self.prefix}_{name}", name, value=gauge)


def is_allowed(remote: str, allowed: Sequence[Network]) -> bool:
    """Whether a peer address (as the socket reports it) is inside one of ``allowed``."""
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
    return any(address in network for network in allowed)


MAX_SCRAPES: Final = 8  # connections served at once; more are closed on arrival
SCRAPE_TIMEOUT: Final = 10.0  # seconds a connection may idle (a slow client frees its thread)
BIND_RETRY: Final = 30.0  # seconds between attempts to open a port that could not be opened


class _QuietHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT  # per read

    def setup(self) -> None:
        super().setup()
        # And per connection: a client that trickles a byte now and then is cut at the deadline.
        self._deadline = threading.Timer(SCRAPE_TIMEOUT, self._cut)
        self._deadline.daemon = True
        self._deadline.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self._deadline.cancel()
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one line per scrape would drown the journal)."""


class _GatedServer(ThreadingWSGIServer):
    """Closes a connection from outside the allow-list, or beyond MAX_SCRAPES, on arrival:
    before a thread is started or a byte is read, so nobody outside can tie the service up."""

    allowed: Sequence[Network] = ()

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().server_activate()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not is_allowed(str(client_address[0]), self.allowed):
            return False
        return self._slots.acquire(blocking=False)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the thread
        except BaseException:
            self._slots.release()  # no thread will give the slot back
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that timed out or went away is not worth a traceback in the journal."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("metrics: %s from %s", sys.exc_info()[1], client_address[0])
            return
        super().handle_error(request, client_address)


class MetricsEndpoint:
    """The metrics port, opened in the background: ``bound`` is set once it listens."""

    def __init__(self) -> None:
        self.bound = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()  # closed and server change together
        self.server: _GatedServer | None = None

    @property
    def port(self) -> int:
        return self.server.server_port if self.server else 0

    def close(self) -> None:
        with self.lock:
            self.closed.set()
            server = self.server
        if server is not None:
            server.shutdown()
            server.server_close()


def serve_metrics(
    prefix: str,
    counters: Counters,
    address: str,
    port: int,
    allowed: Sequence[Network] = (),
    retry: float = BIND_RETRY,
) -> MetricsEndpoint:
    """Expose the counters as ``<prefix>_<name>_total`` on http://address:port/metrics.

    Only peers inside ``allowed`` are served; any other connection is closed at once (the
    unit's IPAddressAllow= may drop it earlier, but face-writer's unit cannot: it talks to S3
    anywhere). A port that cannot be opened (taken, or an address not yet assigned at boot) is
    logged and tried again every ``retry`` seconds: metrics never stop the service.
    """
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Collector(prefix, counters))
    app = make_wsgi_app(registry)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    server_class = type("Server", (_GatedServer,), {"address_family": family, "allowed": allowed})
    endpoint = MetricsEndpoint()

    reported = ""

    def open_port() -> bool:
        nonlocal reported
        try:
            server = cast(
                _GatedServer,
                make_server(address, port, app, server_class, handler_class=_QuietHandler),
            )
        except (OSError, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if reason != reported:  # once per reason, not every attempt
                log.error(
                    "FACEPIPE_METRICS_PORT: cannot listen on %s:%d (%s); trying again every "
                    "%.0f s, the service runs on without metrics",
                    address,
                    port,
                    reason,
                    retry,
                )
                reported = reason
            return False
        with endpoint.lock:
            if endpoint.closed.is_set():  # closed while this was binding
                server.server_close()
                return False
            endpoint.server = server
        endpoint.bound.set()
        log.info(
            "metrics on http://%s:%d/metrics for %s",
            address,
            server.server_port,
            ", ".join(str(network) for network in allowed) or "this host only",
        )
        return True

    def run() -> None:
        while endpoint.server is None and not endpoint.closed.wait(retry):
            open_port()
        if endpoint.server is not None:  # always served once opened: close() waits for it
            endpoint.server.serve_forever()

    open_port()  # at once, so a scrape right after start finds the port open
    threading.Thread(target=run, name="metrics", daemon=True).start()
    return endpoint


def format_counters(values: dict[str, int | float]) -> str:
    return " ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


class StatsReporter:
    """Logs one stats line every ``interval`` seconds and mirrors it to systemd's STATUS=.

    ``rates`` names counters to also report per second (``frames`` -> ``fps``-style rates).
    """

    def __init__(
        self,
        counters: Counters,
        interval: float,
        status: Callable[[str], None],
        rates: dict[str, str] | None = None,
    ) -> None:
        self.counters = counters
        self.interval = interval
        self.status = status
        self.rates = rates or {}
        self._last = counters.snapshot()
        self._last_time = time.monotonic()
        self._next = self._last_time + interval

    def line(self) -> str:
        now = time.monotonic()
        values = self.counters.snapshot()
        elapsed = max(now - self._last_time, 1e-9)
        shown: dict[str, int | float] = {}
        for counter, rate_name in self.rates.items():
            shown[rate_name] = (values.get(counter, 0) - self._last.get(counter, 0)) / elapsed
        shown.update(values)
        shown.update(self.counters.gauges())
        self._last, self._last_time = values, now
        return format_counters(shown)

    def tick(self) -> None:
        """Call from the main loop; emits a line when the interval has passed."""
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.interval
            text = self.line()
            log.info("stats %s", text)
            self.status(text)
