"""The etcd backend of the cluster directory: etcd v3 through its JSON
gateway (/v3/...), over TLS with client certificates and user/password auth
(etcds://), or plain HTTP for a lab (etcd://).

Keys under /sockgraft/nodes/<owner>/: the node document (`node`) and one key
per record (`svc/<proto>/<overlay>/<port>`), all attached to the agent's lease
(keep-alive every ttl/3); a watch on /sockgraft/nodes/ keeps the view. The
reader stamps records with etcd's create revision (`since`), never the
writer's say; what a record must satisfy is model/directory.admit's.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from ..errors import ConfigError
from ..model import directory as mdir
from .directory import DEFAULT_TTL, Backend, parse_node, parse_record

log = logging.getLogger("sockgraft.directory")


@dataclass(frozen=True)
class EtcdAccess:
    """How to reach etcd safely: TLS material and user/password auth."""

    ca: str | None = None           # CA bundle that signed the server certificate
    cert: str | None = None         # client certificate (etcd --client-cert-auth)
    key: str | None = None
    user: str | None = None         # etcd user (role limited to /sockgraft/)
    password_file: str | None = None

    def check(self, tls: bool) -> None:
        if not tls and (self.ca or self.cert or self.key):
            raise ConfigError("--directory-ca/-cert/-key need an etcds:// endpoint",
                              field="directory")
        if bool(self.cert) != bool(self.key):
            raise ConfigError("--directory-cert and --directory-key go together",
                              field="directory-cert")
        if bool(self.user) != bool(self.password_file):
            raise ConfigError("--directory-user needs --directory-password-file",
                              field="directory-user")
        for name in ("ca", "cert", "key", "password_file"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"directory {name.replace('_', ' ')} {path} is not "
                                  "readable", field=f"directory-{name}", value=path)

    def password(self) -> str:
        assert self.password_file
        with open(self.password_file) as f:
            return f.read().strip()


class EtcdDirectory(Backend):
    """etcd v3 through the JSON gateway (etcd >= 3.4 serves /v3/...)."""

    kind = "etcd"
    PREFIX = "/sockgraft/nodes/"
    # whoever can write to etcd can make it answer anything: the agent reads
    # at most this much per answer (and per watch message) and reconnects
    MAX_RESPONSE = 64 << 20

    def __init__(self, url: str, owner: str, ttl: float = DEFAULT_TTL,
                 timeout: float = 2.0, access: EtcdAccess | None = None) -> None:
        super().__init__(owner, ttl)
        if "/" in owner or not owner:
            raise ConfigError(f"directory owner {owner!r} may not contain '/'",
                              field="owner", value=owner)
        u = urlparse(url if "://" in url else f"http://{url}")
        if u.scheme not in ("http", "etcd", "https", "etcds") or not u.hostname:
            raise ConfigError(f"etcd endpoint {url!r}: expected etcds://HOST:PORT "
                              "(or http://HOST:PORT in a lab)", field="directory", value=url)
        self.tls = u.scheme in ("https", "etcds")
        self.access = access or EtcdAccess()
        self.access.check(self.tls)
        self.host, self.port = u.hostname, u.port or 2379
        self.timeout = timeout
        self._ssl = self._ssl_context() if self.tls else None
        if not self.tls:
            log.warning("etcd %s:%s over plain HTTP: anybody who can reach it can redirect "
                        "grafted connections; use etcds:// with client certificates "
                        "outside a lab", self.host, self.port)
        self._token: str | None = None
        self._memo: dict[tuple[bool, bytes], dict | None] = {}
        self._lease = 0
        self._published: dict[str, str] = {}     # key -> value we put under our lease
        # our keys someone else changed or deleted (seen by the watch thread):
        # put back at the next reconcile
        self._tampered: list[str] = []
        self._tamper_lock = threading.Lock()
        self._watch_thread: threading.Thread | None = None
        self._watch_conn: http.client.HTTPConnection | None = None

    def _ssl_context(self):
        import ssl
        ctx = ssl.create_default_context(cafile=self.access.ca)
        if self.access.cert:
            ctx.load_cert_chain(self.access.cert, self.access.key)
        return ctx

    # -- HTTP/JSON ---------------------------------------------------------------

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self.tls:
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self._ssl)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _headers(self) -> dict:
        h = {"Content-Type": "application/json"}
        if self.access.user:
            if self._token is None:
                self._authenticate()
            h["Authorization"] = self._token or ""
        return h

    def _authenticate(self) -> None:
        res = self._post("/v3/auth/authenticate", {"name": self.access.user,
                                                   "password": self.access.password()},
                         {"Content-Type": "application/json"})
        self._token = res.get("token")
        if not self._token:
            raise OSError("etcd authentication returned no token")

    def _post(self, path: str, body: dict, headers: dict) -> dict:
        conn = self._connect(self.timeout)
        try:
            conn.request("POST", path, json.dumps(body), headers)
            resp = conn.getresponse()
            data = resp.read(self.MAX_RESPONSE + 1)
        finally:
            conn.close()
        if len(data) > self.MAX_RESPONSE:
            raise OSError(f"etcd {path}: answer over {self.MAX_RESPONSE} bytes, not read")
        if resp.status != 200:
            raise EtcdError(path, resp.status, data)
        return json.loads(data or b"{}")

    def _call(self, path: str, body: dict) -> dict:
        try:
            return self._post(path, body, self._headers())
        except EtcdError as exc:
            if not (self.access.user and exc.auth_expired):
                raise
        self._token = None                  # simple tokens expire: once more, fresh
        return self._post(path, body, self._headers())

    def _own_prefix(self) -> str:
        return f"{self.PREFIX}{self.owner}/"

    def _range(self, prefix: str) -> tuple[list[tuple[str, bytes, int]], int]:
        res = self._call("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(_end(prefix))})
        kvs = [(_unb64(kv["key"]).decode(), _unb64(kv.get("value", "")),
                int(kv.get("create_revision", 0))) for kv in res.get("kvs", [])]
        return kvs, int(res.get("header", {}).get("revision", 0))

    def _load_previous(self) -> None:
        try:
            kvs, _ = self._range(self._own_prefix() + "svc/")
        except (OSError, ValueError) as exc:
            self.last_error = str(exc)
            return
        for _k, v, _rev in kvs:
            r = parse_record(v)
            if r is not None:
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
                    self._call("/v3/kv/deleterange", {"key": _b64(self._own_prefix()),
                                                      "range_end": _b64(_end(self._own_prefix()))})
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

    def _note_foreign(self, key: str, value: bytes | None, lease: int | None = None) -> None:
        """The watch saw `key` of our own prefix become `value` (None:
        deleted; lease: the one it was put under, None: not known). Not what
        we put: somebody else wrote it (a PUT to an existing key keeps its
        create revision, so a forged record would keep our record's rank; a
        key we never put, or one without our lease, would outlive us) - put
        ours back, or delete theirs, at once. Keys of others' prefixes: not
        ours to judge."""
        if not key.startswith(self._own_prefix()):
            return
        mine = self._published.get(key)
        if mine is None and value is None:
            return                          # (a key we deleted, or nobody's)
        if mine is not None and value is not None and value == mine.encode() and \
                (lease is None or not self._lease or lease == self._lease):
            return
        log.warning("directory: our record %s was %s by somebody else; %s", key,
                    "deleted" if value is None else "written",
                    "putting it back" if mine is not None else "deleting it")
        with self._tamper_lock:
            self._tampered.append(key)
        self._dirty.set()

    def _reconcile(self) -> None:
        own = self._own_prefix()
        wanted = {f"{own}svc/{k}": json.dumps(r, sort_keys=True)
                  for k, r in self._wanted_copy().items()}
        node = self._node_copy()
        if node is not None:
            wanted[f"{own}node"] = json.dumps(node, sort_keys=True)
        with self._tamper_lock:
            tampered, self._tampered = self._tampered, []
        for k in set(tampered):
            self._published.pop(k, None)    # (wanted: put back below)
            if k not in wanted:
                self._call("/v3/kv/deleterange", {"key": _b64(k)})
        for k in [k for k in self._published if k not in wanted]:
            del self._published[k]          # (before: the watch may see the delete first)
            self._call("/v3/kv/deleterange", {"key": _b64(k)})
        for k, v in wanted.items():
            if self._published.get(k) != v:
                self._published[k] = v      # (before: the watch may see the put first)
                self._call("/v3/kv/put", {"key": _b64(k), "value": _b64(v),
                                          "lease": str(self._lease)})

    def _withdraw(self) -> None:
        if self._lease:
            self._call("/v3/lease/revoke", {"ID": str(self._lease)})
            self._lease = 0

    # -- watcher ---------------------------------------------------------------------

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                kvs, rev = self._range(self.PREFIX)
                state: dict[str, tuple[bytes, int]] = {k: (v, crev) for k, v, crev in kvs}
                if self._lease:             # (what changed while the watch was away)
                    for k, (v, _crev) in state.items():
                        self._note_foreign(k, v)
                self._publish_view(state, True)
                self._stream(state, rev + 1)
            except (OSError, ValueError, KeyError, http.client.HTTPException) as exc:
                if self.reachable:
                    log.warning("etcd %s:%s unreachable: %s; new connections take the "
                                "overlay until it is back", self.host, self.port, exc)
                self.last_error = str(exc)
                self._publish_view({}, False)
                self._stop.wait(0.5)

    def _publish_view(self, state: dict[str, tuple[bytes, int]], reachable: bool) -> None:
        """state: key -> (value, create revision). The revision is `since`."""
        by_owner: dict[str, list[dict]] = {}
        nodes: dict[str, dict] = {}
        seen: dict[tuple[str, str], float] = {}
        node_seen: dict[str, float] = {}
        parsed: dict[tuple[bool, bytes], dict | None] = {}   # each value checked (and
        for k, (v, crev) in state.items():                   # complained about) once
            owner, _, rest = k[len(self.PREFIX):].partition("/")
            if rest == "node":
                doc = self._memo.get((True, v), 0)
                if doc == 0:
                    doc = parse_node(v)
                parsed[(True, v)] = doc
                if doc is not None and doc.get("owner") == owner:
                    nodes[owner] = doc
                    node_seen[owner] = float(crev)
            elif rest.startswith("svc/"):
                r = self._memo.get((False, v), 0)
                if r == 0:
                    r = _json(v)
                parsed[(False, v)] = r
                if r is not None:
                    by_owner.setdefault(owner, []).append(r)
                    seen[(owner, mdir._safe_key(r))] = float(crev)
        self._memo = parsed
        self._set_view(by_owner, nodes, seen, node_seen, reachable)

    def _stream(self, state: dict[str, tuple[bytes, int]], start_rev: int) -> None:
        """Follow the prefix from start_rev. Returns (and the caller reads the
        whole prefix again, keeping the view) when the watch stays silent for
        a lease period: etcd sends progress notifications only every ten
        minutes, and silence is not an outage - the range request decides."""
        conn = self._connect(self.ttl)
        self._watch_conn = conn
        body = {"create_request": {"key": _b64(self.PREFIX), "range_end": _b64(_end(self.PREFIX)),
                                   "start_revision": str(start_rev), "progress_notify": True}}
        try:
            conn.request("POST", "/v3/watch", json.dumps(body), self._headers())
            resp = conn.getresponse()
            if resp.status != 200:
                raise OSError(f"etcd watch: HTTP {resp.status}")
            dec = json.JSONDecoder()
            buf = ""
            while not self._stop.is_set():
                try:
                    chunk = resp.read1(65536)
                except TimeoutError:
                    return
                if not chunk:
                    raise OSError("etcd closed the watch")
                buf += chunk.decode()
                if len(buf) > self.MAX_RESPONSE:
                    raise OSError(f"etcd watch: a message over {self.MAX_RESPONSE} bytes")
                while True:
                    buf = buf.lstrip()
                    if not buf:
                        break
                    try:
                        msg, end = dec.raw_decode(buf)
                    except ValueError:
                        break
                    buf = buf[end:]
                    if "error" in msg:
                        raise OSError(f"etcd watch: {msg['error']}")
                    result = msg.get("result", {})
                    if result.get("canceled"):
                        raise OSError(f"etcd canceled the watch: {result}")
                    changed = False
                    for ev in result.get("events", []):
                        kv = ev.get("kv", {})
                        k = _unb64(kv.get("key", "")).decode()
                        if ev.get("type") == "DELETE":
                            changed |= state.pop(k, None) is not None
                            self._note_foreign(k, None)
                        else:
                            state[k] = (_unb64(kv.get("value", "")),
                                        int(kv.get("create_revision", 0)))
                            changed = True
                            self._note_foreign(k, state[k][0], int(kv.get("lease", 0) or 0))
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


class EtcdError(OSError):
    def __init__(self, path: str, status: int, body: bytes) -> None:
        super().__init__(f"etcd {path}: HTTP {status} {body[:200]!r}")
        self.status = status
        self.auth_expired = status == 401 or b"invalid auth token" in body


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s) if s else b""


def _end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return "<not JSON>"
