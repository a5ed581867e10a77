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
             (keep-alive every ttl/3), and a watch on /sockgraft/nodes/;
             in agent/etcd.py (etcds:// speaks TLS with client certificates
             and user/password auth; plain etcd:// is for a lab).

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

import json
import logging
import os
import threading
import time

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
        doc = self._load(self._mine, self.owner)
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


def open_backend(spec: str, owner: str, ttl: float, state_dir: str,
                 access=None, lab: str | None = None) -> Backend | None:
    """`--directory` values: embedded[:PATH] | etcds://HOST:PORT | https://HOST:PORT |
    etcd://HOST:PORT | http://HOST:PORT (plain: lab only) | off. access: the
    etcd backend's TLS and auth settings (agent/etcd.EtcdAccess). lab: the
    embedded directory of a lab's agents is the lab's own (directory-LAB)."""
    if spec == "off":
        return None
    if spec == "embedded" or spec.startswith("embedded:"):
        path = spec.partition(":")[2] or os.path.join(
            state_dir, f"directory-{lab}" if lab else "directory")
        return EmbeddedDirectory(path, owner, ttl)
    if spec.startswith(("etcd://", "http://", "etcds://", "https://")):
        from .etcd import EtcdDirectory
        return EtcdDirectory(spec, owner, ttl, access=access)
    raise ConfigError(f"directory {spec!r} unknown; accepted: embedded[:PATH], "
                      "etcds://HOST:PORT, etcd://HOST:PORT (lab), off", field="directory",
                      value=spec)


def _parse(raw: bytes, valid) -> dict | None:
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    return obj if valid(obj, "etcd") else None


def parse_record(raw: bytes) -> dict | None:
    """A record as stored (JSON), checked; None (logged) if it is not one."""
    return _parse(raw, _valid)


def parse_node(raw: bytes) -> dict | None:
    """A node document as stored (JSON), checked; None (logged) if not one."""
    return _parse(raw, _valid_node)
