"""Directory backends: where agents publish their grafted services and watch
everybody else's. One interface, two backends:

  embedded   a directory of JSON files on this machine, one per agent, each
             with a lease (expires_at). No server; for one node and for the
             lab, whose hosts share the machine. Writes are atomic renames.
  etcd       a real etcd v3 cluster through its JSON gateway (/v3/...): one key
             per record under /sockgraft/services/<owner>/, attached to the
             agent's lease (keep-alive every ttl/3), and a watch on the prefix.

Each backend runs one worker thread that does all I/O; the agent's loop never
waits on the network: `publish` only hands over the wanted set, `table()`
returns the last merged view, and `fileno()` becomes readable when the view
changed (the agent polls it in its epoll). When the directory is unreachable
the view is empty, so new connections take the normal overlay path; they
resume the bypass once it is back.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import threading
import time
from urllib.parse import urlparse

from ..errors import ConfigError, SockgraftError
from ..model import directory as mdir

log = logging.getLogger("sockgraft.directory")

DEFAULT_TTL = 10.0


class Backend:
    """Common part: wanted set in, merged table out, a pipe to wake the agent."""

    kind = "base"

    def __init__(self, owner: str, ttl: float = DEFAULT_TTL) -> None:
        if ttl < 1:
            raise ConfigError(f"directory lease {ttl} s is too short; at least 1 s",
                              field="ttl", value=ttl)
        self.owner = owner
        self.ttl = ttl
        self._lock = threading.Lock()
        self._wanted: dict[str, dict] = {}
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._table: dict[str, dict] = {}
        self._conflicts: list[mdir.Conflict] = []
        self.previous: list[dict] = []     # our own records found at start (restart)
        self.reachable = False
        self.last_error = ""
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None

    # --- agent side ---------------------------------------------------------

    def start(self) -> None:
        self._load_previous()
        self._thread = threading.Thread(target=self._run, name=f"directory-{self.kind}",
                                        daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._r

    def drain(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass

    def publish(self, records: dict[str, dict]) -> None:
        with self._lock:
            self._wanted = dict(records)
        self._dirty.set()

    def table(self) -> dict[str, dict]:
        return self._table

    def conflicts(self) -> list[mdir.Conflict]:
        return self._conflicts

    def close(self, withdraw: bool = True) -> None:
        """Stop the worker; withdraw our records (a clean stop) or leave them
        to their lease (tests simulating a crash pass withdraw=False)."""
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if withdraw:
            try:
                self._withdraw()
            except (OSError, SockgraftError) as exc:
                log.warning("directory: could not withdraw our records: %s", exc)
        for fd in (self._r, self._w):
            os.close(fd)

    # --- worker side ----------------------------------------------------------

    def _set_view(self, by_owner: dict[str, list[dict]], reachable: bool) -> None:
        table, conflicts = mdir.merge(by_owner)
        changed = table != self._table or reachable != self.reachable or \
            [str(c) for c in conflicts] != [str(c) for c in self._conflicts]
        self._table = table
        self._conflicts = conflicts
        self.reachable = reachable
        if changed:
            try:
                os.write(self._w, b"!")
            except BlockingIOError:
                pass

    def _wanted_copy(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._wanted)

    def _run(self) -> None:
        raise NotImplementedError

    def _load_previous(self) -> None:
        pass

    def _withdraw(self) -> None:
        raise NotImplementedError


class EmbeddedDirectory(Backend):
    """JSON files in `path`, one per owner: {"owner", "expires_at", "records"}."""

    kind = "embedded"
    POLL = 0.1

    def __init__(self, path: str, owner: str, ttl: float = DEFAULT_TTL) -> None:
        super().__init__(owner, ttl)
        self.path = path
        os.makedirs(path, mode=0o755, exist_ok=True)
        self._mine = os.path.join(path, f"{owner}.json")
        self._seen: dict[str, tuple[float, int, list[dict], float]] = {}

    def _load_previous(self) -> None:
        doc = _read_json(self._mine)
        if doc and isinstance(doc.get("records"), list):
            self.previous = [r for r in doc["records"] if _valid(r, self._mine)]

    def _write(self, records: list[dict]) -> None:
        doc = {"owner": self.owner, "expires_at": time.time() + self.ttl, "records": records}
        tmp = f"{self._mine}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self._mine)

    def _scan(self) -> dict[str, list[dict]]:
        now = time.time()
        out: dict[str, list[dict]] = {}
        names = set()
        for name in os.listdir(self.path):
            if not name.endswith(".json"):
                continue
            full = os.path.join(self.path, name)
            names.add(full)
            try:
                st = os.stat(full)
            except FileNotFoundError:
                continue
            cached = self._seen.get(full)
            if cached is None or cached[:2] != (st.st_mtime, st.st_size):
                doc = _read_json(full) or {}
                recs = [r for r in doc.get("records", []) if _valid(r, full)] \
                    if isinstance(doc.get("records"), list) else []
                exp = doc.get("expires_at", 0)
                cached = (st.st_mtime, st.st_size, recs,
                          exp if isinstance(exp, (int, float)) else 0)
                self._seen[full] = cached
            if cached[3] > now:
                owner = name[:-5]
                out[owner] = cached[2]
        for gone in set(self._seen) - names:
            del self._seen[gone]
        return out

    def _run(self) -> None:
        last_write = 0.0
        written: list[dict] | None = None
        while not self._stop.is_set():
            try:
                wanted = sorted(self._wanted_copy().values(), key=mdir.record_key)
                now = time.monotonic()
                if wanted != written or now - last_write > self.ttl / 3:
                    self._write(wanted)
                    written, last_write = wanted, now
                self._set_view(self._scan(), True)
            except OSError as exc:
                self.last_error = str(exc)
                log.warning("directory %s: %s", self.path, exc)
            self._dirty.wait(self.POLL)
            self._dirty.clear()

    def _withdraw(self) -> None:
        try:
            os.unlink(self._mine)
        except FileNotFoundError:
            pass


class EtcdDirectory(Backend):
    """etcd v3 through the JSON gateway (etcd >= 3.4 serves /v3/...)."""

    kind = "etcd"
    PREFIX = "/sockgraft/services/"

    def __init__(self, url: str, owner: str, ttl: float = DEFAULT_TTL,
                 timeout: float = 2.0) -> None:
        super().__init__(owner, ttl)
        u = urlparse(url if "://" in url else f"http://{url}")
        if u.scheme not in ("http", "etcd") or not u.hostname:
            raise ConfigError(f"etcd endpoint {url!r}: expected http://HOST:PORT",
                              field="directory", value=url)
        self.host, self.port = u.hostname, u.port or 2379
        self.timeout = timeout
        self._lease = 0
        self._published: dict[str, str] = {}     # key -> value we put under our lease
        self._watch_thread: threading.Thread | None = None
        self._watch_conn: http.client.HTTPConnection | None = None

    # -- HTTP/JSON ---------------------------------------------------------------

    def _call(self, path: str, body: dict) -> dict:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if resp.status != 200:
            raise OSError(f"etcd {path}: HTTP {resp.status} {data[:200]!r}")
        return json.loads(data or b"{}")

    def _own_prefix(self) -> str:
        return f"{self.PREFIX}{self.owner}/"

    def _range(self, prefix: str) -> tuple[list[tuple[str, bytes]], int]:
        res = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(_end(prefix))})
        kvs = [(_unb64(kv["key"]).decode(), _unb64(kv.get("value", ""))) for kv in
               res.get("kvs", [])]
        return kvs, int(res.get("header", {}).get("revision", 0))

    def _load_previous(self) -> None:
        try:
            kvs, _ = self._range(self._own_prefix())
        except (OSError, ValueError) as exc:
            self.last_error = str(exc)
            return
        for _k, v in kvs:
            try:
                r = json.loads(v)
            except ValueError:
                continue
            if _valid(r, "etcd"):
                self.previous.append(r)

    # -- publisher -----------------------------------------------------------------

    def _run(self) -> None:
        self._watch_thread = threading.Thread(target=self._watch_loop, daemon=True,
                                              name="directory-etcd-watch")
        self._watch_thread.start()
        next_keepalive = 0.0
        while not self._stop.is_set():
            try:
                if not self._lease:
                    res = self._call("/v3/lease/grant", {"TTL": int(max(1, round(self.ttl)))})
                    self._lease = int(res["ID"])
                    self._published.clear()
                    # the previous incarnation's keys are ours to replace
                    kvs, _ = self._range(self._own_prefix())
                    for k, _v in kvs:
                        self._call("/v3/kv/deleterange", {"key": _b64(k)})
                    next_keepalive = time.monotonic() + self.ttl / 3
                self._reconcile()
                if time.monotonic() >= next_keepalive:
                    res = self._call("/v3/lease/keepalive", {"ID": str(self._lease)})
                    ttl = int(res.get("result", {}).get("TTL", 0) or 0)
                    if ttl <= 0:        # the lease expired while we were cut off
                        self._lease = 0
                        continue
                    next_keepalive = time.monotonic() + self.ttl / 3
            except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
                if self.last_error != str(exc):
                    log.warning("etcd %s:%s: %s (publishing paused)", self.host, self.port,
                                exc)
                self.last_error = str(exc)
                self._lease = 0
                self._stop.wait(0.5)
                continue
            self._dirty.wait(0.2)
            self._dirty.clear()

    def _reconcile(self) -> None:
        wanted = {f"{self._own_prefix()}{k}": json.dumps(r, sort_keys=True)
                  for k, r in self._wanted_copy().items()}
        for k in [k for k in self._published if k not in wanted]:
            self._call("/v3/kv/deleterange", {"key": _b64(k)})
            del self._published[k]
        for k, v in wanted.items():
            if self._published.get(k) != v:
                self._call("/v3/kv/put", {"key": _b64(k), "value": _b64(v),
                                          "lease": str(self._lease)})
                self._published[k] = v

    def _withdraw(self) -> None:
        if self._lease:
            self._call("/v3/lease/revoke", {"ID": str(self._lease)})
            self._lease = 0

    # -- watcher ---------------------------------------------------------------------

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                kvs, rev = self._range(self.PREFIX)
                state: dict[str, dict] = {}
                for k, v in kvs:
                    r = _parse(v)
                    if r is not None:
                        state[k] = r
                self._publish_view(state, True)
                self._stream(state, rev + 1)
            except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
                if self.reachable:
                    log.warning("etcd %s:%s unreachable: %s; new connections take the "
                                "overlay until it is back", self.host, self.port, exc)
                self.last_error = str(exc)
                self._publish_view({}, False)
                self._stop.wait(0.5)

    def _publish_view(self, state: dict[str, dict], reachable: bool) -> None:
        by_owner: dict[str, list[dict]] = {}
        for k, r in state.items():
            owner = k[len(self.PREFIX):].split("/", 1)[0]
            by_owner.setdefault(owner, []).append(r)
        self._set_view(by_owner, reachable)

    def _stream(self, state: dict[str, dict], start_rev: int) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.ttl)
        self._watch_conn = conn
        body = {"create_request": {"key": _b64(self.PREFIX), "range_end": _b64(_end(self.PREFIX)),
                                   "start_revision": str(start_rev), "progress_notify": True}}
        try:
            conn.request("POST", "/v3/watch", json.dumps(body),
                         {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise OSError(f"etcd watch: HTTP {resp.status}")
            dec = json.JSONDecoder()
            buf = ""
            while not self._stop.is_set():
                chunk = resp.read1(65536)
                if not chunk:
                    raise OSError("etcd closed the watch")
                buf += chunk.decode()
                while True:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    try:
                        msg, end = dec.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[end:]
                    result = msg.get("result", {})
                    if result.get("canceled"):
                        raise OSError(f"etcd canceled the watch: {result}")
                    changed = False
                    for ev in result.get("events", []):
                        kv = ev.get("kv", {})
                        k = _unb64(kv.get("key", "")).decode()
                        if ev.get("type") == "DELETE":
                            changed |= state.pop(k, None) is not None
                        else:
                            r = _parse(_unb64(kv.get("value", "")))
                            if r is not None:
                                state[k] = r
                                changed = True
                    if changed or not self.reachable:
                        self._publish_view(state, True)
        finally:
            conn.close()
            self._watch_conn = None

    def close(self, withdraw: bool = True) -> None:
        self._stop.set()
        conn = self._watch_conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(2)
            except OSError:
                pass
        super().close(withdraw)
        if self._watch_thread is not None:
            self._watch_thread.join(timeout=5)


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s) if s else b""


def _end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _parse(raw: bytes) -> dict | None:
    try:
        r = json.loads(raw)
    except ValueError:
        return None
    return r if _valid(r, "etcd") else None


def _valid(r: object, source: str) -> bool:
    try:
        mdir.check_record(r, source)
        return True
    except ConfigError as exc:
        log.warning("directory: ignoring a record from %s: %s", source, exc)
        return False


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def open_backend(spec: str, owner: str, ttl: float, state_dir: str) -> Backend | None:
    """`--directory` values: embedded[:PATH] | etcd://HOST:PORT | http://HOST:PORT | off."""
    if spec == "off":
        return None
    if spec == "embedded" or spec.startswith("embedded:"):
        path = spec.partition(":")[2] or os.path.join(state_dir, "directory")
        return EmbeddedDirectory(path, owner, ttl)
    if spec.startswith(("etcd://", "http://")):
        return EtcdDirectory(spec.replace("etcd://", "http://", 1), owner, ttl)
    raise ConfigError(f"directory {spec!r} unknown; accepted: embedded[:PATH], "
                      "etcd://HOST:PORT, off", field="directory", value=spec)

