"""Directory backends: where agents publish their grafted services and watch
everybody else's. One interface, two backends:

  embedded   a directory of JSON files on this machine, one per agent, each
             with a lease (expires_at) and the agent's node document. No
             server; for one node and for the lab, whose hosts share the
             machine. Writes are atomic renames. The directory is the agent's
             (owner root, mode 0700), each file 0600; a file or directory that
             anybody else owns or could write is ignored on read (logged).
  etcd       a real etcd v3 cluster through its JSON gateway (/v3/...): under
             /sockgraft/nodes/<owner>/ the node document (`node`) and one key
             per record (`svc/<key>`), attached to the agent's lease
             (keep-alive every ttl/3), and a watch on /sockgraft/nodes/.
             etcds:// speaks TLS (CA, client certificate) and user/password
             auth gets a token; plain http:// is for the lab only.

Records are trusted only as model.directory.admit says: under their owner's
name, with host addresses of the owner's node and overlay addresses of its
containers; `since` is the reader's (etcd create revision, or first seen).

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
from dataclasses import dataclass
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
        self._node: dict | None = None
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._table: dict[str, dict] = {}
        self._conflicts: list[mdir.Conflict] = []
        self._rejected: list[mdir.Rejected] = []
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

    def publish_node(self, doc: dict) -> None:
        """This agent's node document (model.directory.node_document): what
        other agents check its records against."""
        with self._lock:
            changed = doc != self._node
            self._node = dict(doc)
        if changed:
            self._dirty.set()

    def table(self) -> dict[str, dict]:
        return self._table

    def conflicts(self) -> list[mdir.Conflict]:
        return self._conflicts

    def rejected(self) -> list[mdir.Rejected]:
        """Records the last view refused to follow (and why)."""
        return self._rejected

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

    def _set_view(self, by_owner: dict[str, list[dict]], nodes: dict[str, dict],
                  seen: dict[tuple[str, str], float], node_seen: dict[str, float],
                  reachable: bool) -> None:
        table, conflicts, rejected = mdir.admit(by_owner, nodes, seen, node_seen)
        old = {str(r) for r in self._rejected}
        new = [r for r in rejected if str(r) not in old]
        for r in new[:10]:
            log.warning("directory: %s", r)
        if len(new) > 10:
            log.warning("directory: %d more records rejected", len(new) - 10)
        changed = table != self._table or reachable != self.reachable or \
            [str(c) for c in conflicts] != [str(c) for c in self._conflicts] or \
            {str(r) for r in rejected} != old
        self._table = table
        self._conflicts = conflicts
        self._rejected = rejected
        self.reachable = reachable
        if changed:
            try:
                os.write(self._w, b"!")
            except BlockingIOError:
                pass

    def _wanted_copy(self) -> dict[str, dict]:
        with self._lock:
            return dict(self._wanted)

    def _node_copy(self) -> dict | None:
        with self._lock:
            return None if self._node is None else dict(self._node)

    def _run(self) -> None:
        raise NotImplementedError

    def _load_previous(self) -> None:
        pass

    def _withdraw(self) -> None:
        raise NotImplementedError


class EmbeddedDirectory(Backend):
    """JSON files in `path`, one per owner:
    {"owner", "expires_at", "node": {node document}, "records": [...]}."""

    kind = "embedded"
    POLL = 0.1

    def __init__(self, path: str, owner: str, ttl: float = DEFAULT_TTL) -> None:
        super().__init__(owner, ttl)
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)
        why = _unsafe(os.stat(path))
        if why is not None:
            raise ConfigError(f"directory {path} {why}: anybody who can write there can "
                              "redirect grafted connections; make it the agent's own "
                              f"(chown {os.geteuid()} {path}; chmod 700 {path})",
                              field="directory", value=path)
        self._mine = os.path.join(path, f"{owner}.json")
        self._seen: dict[str, tuple[float, int, dict | None, float]] = {}
        self._first: dict[tuple[str, str], float] = {}
        self._first_node: dict[str, float] = {}
        self._unsafe_logged: set[str] = set()

    def _load_previous(self) -> None:
        doc = _read_json(self._mine)
        if doc and isinstance(doc.get("records"), list):
            self.previous = [r for r in doc["records"] if _valid(r, self._mine)]

    def _write(self, records: list[dict]) -> None:
        doc = {"owner": self.owner, "expires_at": time.time() + self.ttl,
               "node": self._node_copy(), "records": records}
        tmp = f"{self._mine}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self._mine)

    def _load(self, full: str, owner: str) -> dict | None:
        """One owner's file, if it is safe to trust: owned by us, writable by
        nobody else, naming the owner its name says."""
        try:
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        with os.fdopen(fd) as f:
            why = _unsafe(os.fstat(fd))
            if why is not None:
                if full not in self._unsafe_logged:
                    self._unsafe_logged.add(full)
                    log.warning("directory: ignoring %s: it %s", full, why)
                return None
            self._unsafe_logged.discard(full)
            try:
                doc = json.load(f)
            except ValueError:
                return None
        if not isinstance(doc, dict) or doc.get("owner") != owner:
            return None
        return doc

    def _scan(self) -> tuple[dict[str, list[dict]], dict[str, dict]]:
        now = time.time()
        out: dict[str, list[dict]] = {}
        nodes: dict[str, dict] = {}
        names = set()
        for name in os.listdir(self.path):
            if not name.endswith(".json"):
                continue
            full = os.path.join(self.path, name)
            owner = name[:-5]
            names.add(full)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue
            cached = self._seen.get(full)
            if cached is None or cached[:2] != (st.st_mtime, st.st_size):
                doc = self._load(full, owner) or {}
                exp = doc.get("expires_at", 0)
                cached = (st.st_mtime, st.st_size, doc,
                          exp if isinstance(exp, (int, float)) else 0)
                self._seen[full] = cached
            doc = cached[2]
            if cached[3] <= now:
                continue
            recs = doc.get("records")
            out[owner] = list(recs) if isinstance(recs, list) else []
            if _valid_node(doc.get("node"), full):
                nodes[owner] = doc["node"]
        for gone in set(self._seen) - names:
            del self._seen[gone]
        return out, nodes

    def _stamp(self, by_owner: dict[str, list[dict]], nodes: dict[str, dict],
               ) -> tuple[dict[tuple[str, str], float], dict[str, float]]:
        """since = when this agent first saw the record (or the owner's node
        document), not what the writer says."""
        now = time.time()
        for first, current in (
                (self._first, {(o, mdir._safe_key(r)) for o, recs in by_owner.items()
                               for r in recs}),
                (self._first_node, set(nodes))):
            for k in current - first.keys():
                first[k] = now
            for k in first.keys() - current:
                del first[k]
        return self._first, self._first_node

    def _run(self) -> None:
        last_write = 0.0
        written: tuple | None = None
        while not self._stop.is_set():
            try:
                wanted = sorted(self._wanted_copy().values(), key=mdir.record_key)
                state = (wanted, self._node_copy())
                now = time.monotonic()
                if state != written or now - last_write > self.ttl / 3:
                    self._write(wanted)
                    written, last_write = state, now
                by_owner, nodes = self._scan()
                self._set_view(by_owner, nodes, *self._stamp(by_owner, nodes), True)
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


def _unsafe(st: os.stat_result) -> str | None:
    """Why a directory file (or the directory) must not be trusted, or None."""
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not the agent's ({os.geteuid()})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {st.st_mode & 0o777:o})"
    return None


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
            data = resp.read()
        finally:
            conn.close()
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
            r = _parse(v)
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

    def _reconcile(self) -> None:
        own = self._own_prefix()
        wanted = {f"{own}svc/{k}": json.dumps(r, sort_keys=True)
                  for k, r in self._wanted_copy().items()}
        node = self._node_copy()
        if node is not None:
            wanted[f"{own}node"] = json.dumps(node, sort_keys=True)
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
                state: dict[str, tuple[bytes, int]] = {k: (v, crev) for k, v, crev in kvs}
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
                    doc = _parse_node(v)
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
                        else:
                            state[k] = (_unb64(kv.get("value", "")),
                                        int(kv.get("create_revision", 0)))
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


def _parse(raw: bytes) -> dict | None:
    try:
        r = json.loads(raw)
    except ValueError:
        return None
    return r if _valid(r, "etcd") else None


def _json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:
        return "<not JSON>"


def _parse_node(raw: bytes) -> dict | None:
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    return doc if _valid_node(doc, "etcd") else None


def _valid_node(doc: object, source: str) -> bool:
    if doc is None:
        return False
    try:
        mdir.check_node(doc, source)
        return True
    except ConfigError as exc:
        log.warning("directory: ignoring a node document from %s: %s", source, exc)
        return False


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


def open_backend(spec: str, owner: str, ttl: float, state_dir: str,
                 access: EtcdAccess | None = None) -> Backend | None:
    """`--directory` values: embedded[:PATH] | etcds://HOST:PORT | https://HOST:PORT |
    etcd://HOST:PORT | http://HOST:PORT (plain: lab only) | off."""
    if spec == "off":
        return None
    if spec == "embedded" or spec.startswith("embedded:"):
        path = spec.partition(":")[2] or os.path.join(state_dir, "directory")
        return EmbeddedDirectory(path, owner, ttl)
    if spec.startswith(("etcd://", "http://", "etcds://", "https://")):
        return EtcdDirectory(spec, owner, ttl, access=access)
    raise ConfigError(f"directory {spec!r} unknown; accepted: embedded[:PATH], "
                      "etcds://HOST:PORT, etcd://HOST:PORT (lab), off", field="directory",
                      value=spec)

