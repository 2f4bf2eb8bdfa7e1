"""Counters shared by a program's threads, the periodic stats line and Prometheus metrics."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from facepipe.config import ConfigError

log = logging.getLogger(__name__)


class Counters:
    """Named monotonic counters plus gauges, safe to update from any thread."""

    def __init__(self, names: Iterable[str], gauges: Iterable[str] = ()) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, int] = dict.fromkeys(names, 0)
        self._gauges: dict[str, float] = dict.fromkeys(gauges, 0.0)

    def inc(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def get(self, name: str) -> int:
        with self._lock:
            return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)

    def gauges(self) -> dict[str, float]:
        with self._lock:
            return dict(self._gauges)


class _Collector(Collector):
    def __init__(self, prefix: str, counters: Counters) -> None:
        self.prefix = prefix
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, value in self.counters.snapshot().items():
            yield CounterMetricFamily(f"{self.prefix}_{name}", f"{name} so far", value=value)
        for name, gauge in self.counters.gauges().items():
            yield GaugeMetricFamily(f"{self.prefix}_{name}", name, value=gauge)


def serve_metrics(prefix: str, counters: Counters, address: str, port: int) -> None:
    """Expose the counters as ``<prefix>_<name>_total`` on http://address:port/metrics."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Collector(prefix, counters))
    try:
        start_http_server(port, addr=address, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"--metrics-port / FACEPIPE_METRICS_PORT: cannot listen on {address}:{port}: "
            f"{exc.strerror}"
        ) from None
    log.info("metrics on http://%s:%d/metrics", address, port)


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
