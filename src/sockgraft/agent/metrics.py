"""Prometheus metrics of the agent (`sockgraft agent --metrics ADDR:PORT`).

The exposition format comes from the `prometheus-client` library, served by
its own HTTP thread. That thread never touches the agent's state: the loop
publishes an immutable snapshot once a second (`Agent.sweep`) and the
collector renders the latest one; only the two histograms (time to answer a
trapped call, reconcile durations) are observed directly, through the
library's thread-safe Histogram.

Label cardinality is bounded: per-container series for at most
MAX_CONTAINERS containers (the rest are summed under container="_other"),
denial series for at most MAX_DENIAL_KEYS (syscall, rule, where) keys (the
rest under rule="_other"). Rule labels are rule names (deny[3],
builtin:loopback, bind:no-endpoint, ...), never addresses.
"""

from __future__ import annotations

import http.server
import logging
import socket
import socketserver
import threading
from typing import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import MetricsHandler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..errors import AgentError

log = logging.getLogger("sockgraft.agent")

MAX_CONTAINERS = 256
MAX_DENIAL_KEYS = 1024
OTHER = "_other"
ANSWER_BUCKETS = (20e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3, 0.2, 1.0)

_COUNTERS = ("grafted", "passed", "denied", "errors", "notifier_failures")


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT`, `[V6ADDR]:PORT` or `:PORT` (every address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentError(f"--metrics {text!r}: expected ADDR:PORT, [V6ADDR]:PORT or :PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.answer_seconds = Histogram(
            "sockgraft_answer_seconds", "time from receiving a trapped call to its answer "
            "(calls the agent's loop answers)", ["syscall"], buckets=ANSWER_BUCKETS,
            registry=self.registry)
        self.reconcile_seconds = Histogram(
            "sockgraft_reconcile_seconds", "duration of one reconcile of the kernel state",
            ["what"], registry=self.registry)
        self._snapshot: dict = {}
        self.registry.register(_Snapshot(self))
        self.server = None

    @classmethod
    def start(cls, listen: str, grafter) -> "Metrics":
        """Serve at `listen`; the grafter reports each answered call's time."""
        m = cls()
        m.serve(listen)
        answer = m.answer_seconds
        grafter.observe = lambda name, dt: answer.labels(name).observe(dt)
        return m

    def timer(self, what: str):
        """A context manager timing one reconcile of `what`."""
        return self.reconcile_seconds.labels(what).time()

    def publish(self, snapshot: dict) -> None:
        """The loop's latest view (a new dict each time: never mutated after)."""
        self._snapshot = snapshot

    def serve(self, listen: str) -> None:
        host, port = parse_listen(listen)
        try:
            self.server = BoundedServer((host, port), MetricsHandler.factory(self.registry))
        except OSError as exc:
            raise AgentError(f"--metrics {listen}: {exc.strerror or exc}") from None
        threading.Thread(target=self.server.serve_forever, daemon=True,
                         name="metrics").start()
        log.info("metrics on http://%s:%d/metrics", host, port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class BoundedServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """prometheus-client's threaded HTTP server, bounded: wherever the port
    is reachable from (a hostPort: every pod), slow or silent connections (a
    slowloris) hold at most CONNECTIONS threads and fds of the agent, each
    for at most TIMEOUT seconds in all; one more is closed at once."""

    CONNECTIONS = 8
    TIMEOUT = 5.0
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler) -> None:
        self.address_family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self._slots = threading.BoundedSemaphore(self.CONNECTIONS)
        super().__init__(addr, handler)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)          # busy: closed, nothing read
            return
        try:
            request.settimeout(self.TIMEOUT)        # a request sent slowly ends here
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        # a deadline for the whole connection, not each receive (a client
        # sending a byte every few seconds would keep its slot for ever)
        deadline = threading.Timer(self.TIMEOUT, _hang_up, (request,))
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self._slots.release()


def _hang_up(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def bounded_denials(denials: dict[tuple[str, str, str], int]) -> dict:
    """At most MAX_DENIAL_KEYS keys, the rest summed under rule="_other"."""
    out: dict[tuple[str, str, str], int] = {}
    for i, ((syscall, rule, where), n) in enumerate(sorted(denials.items())):
        key = (syscall, rule, where) if i < MAX_DENIAL_KEYS else (syscall, OTHER, where)
        out[key] = out.get(key, 0) + n
    return out


class _Snapshot:
    """Renders the loop's snapshot (stats() plus the directory and the
    denials by rule) as metric families."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self) -> Iterator:
        s = self.metrics._snapshot
        if not s:
            return
        for name in _COUNTERS:
            c = CounterMetricFamily(f"sockgraft_{name}", f"trapped calls and sockets: {name}")
            c.add_metric([], s["counters"].get(name, 0))
            yield c
        per = {name: CounterMetricFamily(f"sockgraft_container_{name}",
                                         f"{name}, per container (at most {MAX_CONTAINERS}; "
                                         f"the rest as container=\"{OTHER}\")", labels=["container"])
               for name in _COUNTERS}
        rows: dict[str, dict[str, int]] = {}
        for i, c in enumerate(sorted(s["containers"], key=lambda c: c["container"])):
            name = c["container"] if i < MAX_CONTAINERS else OTHER
            row = rows.setdefault(name, dict.fromkeys(_COUNTERS, 0))
            for k in _COUNTERS:
                row[k] += c.get(k, 0)
        for name, row in rows.items():
            for k in _COUNTERS:
                per[k].add_metric([name], row[k])
        yield from per.values()
        g = GaugeMetricFamily("sockgraft_sessions", "registered process trees")
        g.add_metric([], len(s["containers"]))
        yield g
        g = GaugeMetricFamily("sockgraft_notifier_threads", "live notifier threads")
        g.add_metric([], sum(c.get("notifier_threads", 0) for c in s["containers"]))
        yield g
        g = GaugeMetricFamily("sockgraft_pending_connects", "connects in progress")
        g.add_metric([], s.get("pending_connects", 0))
        yield g
        g = GaugeMetricFamily("sockgraft_kernel_guards", "1: the cgroup programs guard "
                              "grafted sockets")
        g.add_metric([], 1 if s.get("guarded") else 0)
        yield g
        d = CounterMetricFamily("sockgraft_denials", "denials by syscall, rule and where "
                                "(agent or kernel)", labels=["syscall", "rule", "where"])
        for (syscall, rule, where), n in bounded_denials(s.get("denials", {})).items():
            d.add_metric([syscall, rule, where], n)
        yield d
        k = s.get("kernel")
        if k:
            for name in ("connects_judged", "denied", "redirected", "guard_refused"):
                c = CounterMetricFamily(f"sockgraft_kernel_{name}",
                                        f"cgroup programs: {name.replace('_', ' ')}")
                c.add_metric([], k.get(name, 0))
                yield c
        o = s.get("oci")
        if o:
            c = CounterMetricFamily("sockgraft_oci_handoffs", "OCI runtime hand-offs",
                                    labels=["result"])
            c.add_metric(["accepted"], o.get("accepted", 0))
            c.add_metric(["rejected"], o.get("rejected", 0))
            yield c
        dr = s.get("directory")
        if dr and dr.get("directory"):
            for name, value, doc in (
                    ("reachable", 1 if dr.get("reachable") else 0, "1: the directory answers"),
                    ("records", len(dr.get("records", [])), "records in the view"),
                    ("conflicts", len(dr.get("conflicts", [])), "conflicting claims"),
                    ("rejected", len(dr.get("rejected", [])), "records refused by admission")):
                g = GaugeMetricFamily(f"sockgraft_directory_{name}", doc)
                g.add_metric([], value)
                yield g
