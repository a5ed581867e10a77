"""`sockgraft-cni`: a chained CNI plugin (CNI spec 0.3.0 - 1.0.0).

Runs after a plugin that set the interface up (e.g. bridge + host-local) and
registers the container with the node agent: its network namespace, the
addresses the previous plugin assigned, and its graft configuration. The
result is passed through unchanged.

Network configuration (in a conflist, after the main plugin):

    {"type": "sockgraft-cni",
     "stateDir": "/run/sockgraft",           # the agent's state directory
     "agentSocket": "/run/sockgraft/agent-default.sock",
     "container": "web",                     # optional; default from CNI_ARGS
                                             # (K8S_POD_NAMESPACE.K8S_POD_NAME) or the id
     "graft": { ...the container TOML schema as JSON, without "container"... }}

ADD   writes <stateDir>/cni/<id>-<ifname>.json (+ the graft config into the
      store when given) and asks the agent to reload; an agent that does not
      answer fails the ADD (code 11, try again later) and everything written
      is removed again.
DEL   removes what ADD wrote; idempotent, and needs no agent (works while the
      agent restarts).
CHECK the registration exists and names the same namespace.
VERSION the versions below.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import NoReturn

from .errors import CniError

SUPPORTED = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]

# CNI well-known error codes
E_INCOMPATIBLE = 1
E_UNSUPPORTED_FIELD = 2
E_UNKNOWN_CONTAINER = 3
E_INVALID_ENV = 4
E_IO = 5
E_DECODE = 6
E_INVALID_CONFIG = 7
E_TRY_LATER = 11


def _env(name: str, required: bool = True) -> str:
    v = os.environ.get(name, "")
    if required and not v:
        raise CniError(E_INVALID_ENV, f"{name} is not set")
    return v


def _cni_args() -> dict[str, str]:
    out = {}
    for part in os.environ.get("CNI_ARGS", "").split(";"):
        k, eq, v = part.partition("=")
        if eq:
            out[k.strip()] = v.strip()
    return out


def container_name(conf: dict, cid: str) -> str:
    if isinstance(conf.get("container"), str) and conf["container"]:
        return conf["container"]
    args = _cni_args()
    if args.get("K8S_POD_NAME"):
        ns = args.get("K8S_POD_NAMESPACE", "default")
        return _fit(f"{ns}.{args['K8S_POD_NAME']}")
    return _fit(cid)


def _fit(name: str, limit: int = 128) -> str:
    """A name the store takes (at most `limit` characters) that stays unique:
    a longer one keeps its start and gets a hash of the whole (two pods whose
    long names share their first 128 characters must not share an identity -
    its stored config, mark and grants)."""
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[:limit - 17]}-{digest}"


def _ips(prev: dict) -> list[str]:
    out = []
    for ip in prev.get("ips", []) or []:
        addr = ip.get("address", "") if isinstance(ip, dict) else ""
        if addr:
            out.append(addr.split("/")[0])
    return out


def _state_dir(conf: dict) -> str:
    from .paths import state_dir
    return conf.get("stateDir") or state_dir()


def _safe_id(cid: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in cid)[:200]


def state_path(state_dir: str, cid: str, ifname: str) -> str:
    return os.path.join(state_dir, "cni", f"{_safe_id(cid)}-{_safe_id(ifname)}.json")


def registered(state_dir: str, prefix: str = "") -> list[dict]:
    """Every record ADD wrote (whose file name starts with `prefix`), in
    file name order; unreadable ones are skipped."""
    d = os.path.join(state_dir, "cni")
    out = []
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return out
    for name in names:
        if name.startswith(prefix) and name.endswith(".json"):
            try:
                with open(os.path.join(d, name)) as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def registrations(state_dir: str, cid: str) -> list[dict]:
    """What ADD registered for a container id (one record per interface)."""
    return [rec for rec in registered(state_dir, _safe_id(cid) + "-")
            if rec.get("id") == cid]


def _store(state_dir: str):
    from .agent.store import ConfigStore
    return ConfigStore(os.path.join(state_dir, "containers"))


def _reload(conf: dict, state_dir: str, container: str) -> None:
    from .agent import control
    path = conf.get("agentSocket") or os.path.join(state_dir, "agent-default.sock")
    control.request(path, {"op": "reload", "container": container}, timeout=5)


def cmd_add(conf: dict) -> dict:
    from .errors import SockgraftError
    from .model.graftconfig import config_from_dict
    cid, netns, ifname = _env("CNI_CONTAINERID"), _env("CNI_NETNS"), _env("CNI_IFNAME")
    prev = conf.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(E_INVALID_CONFIG, "sockgraft-cni is a chained plugin: no prevResult",
                       "put it after the plugin that creates the interface (e.g. bridge)")
    state_dir = _state_dir(conf)
    container = container_name(conf, cid)
    cfg = None
    if "graft" in conf:
        graft = conf["graft"]
        if not isinstance(graft, dict):
            raise CniError(E_INVALID_CONFIG, "'graft' must be an object")
        try:
            cfg = config_from_dict({**graft, "container": container}, "CNI config 'graft'")
        except SockgraftError as exc:
            raise CniError(E_INVALID_CONFIG, f"invalid graft configuration: {exc}") from None
    # published ports, as the portmap plugin receives them (the conflist
    # declares "capabilities": {"portMappings": true} for this plugin too):
    # a grafted server stays reachable at them (model/redirect.py)
    from .model import redirect
    runtime = conf.get("runtimeConfig") or {}
    ports = runtime.get("portMappings") if isinstance(runtime, dict) else None
    try:
        redirect.parse_ports(ports, "runtimeConfig.portMappings")
    except SockgraftError as exc:
        raise CniError(E_INVALID_CONFIG, str(exc)) from None
    path = state_path(state_dir, cid, ifname)
    record = {"id": cid, "netns": netns, "ifname": ifname, "ips": _ips(prev),
              "container": container, "config_written": cfg is not None,
              "config_digest": _digest(cfg) if cfg is not None else None,
              "ports": ports or []}
    # The record first, then the configuration: a plugin killed in between
    # leaves a record DEL cleans up after, never a configuration (and its
    # mark) nothing points to. A configuration stored before this ADD (by
    # `sockgraft config`, an earlier ADD) is put back if this one fails.
    written: list[str] = []
    previous = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        # (root's only: netns paths, addresses and ports of every pod)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(record, f)
        os.replace(tmp, path)
        written.append("state")
        if cfg is not None:
            store = _store(state_dir)
            try:
                previous = store.load(container)
            except SockgraftError:
                previous = None         # (unreadable: replaced, not put back)
            store.save(cfg)
            written.append("config")
        _reload(conf, state_dir, container)
    except SockgraftError as exc:
        _undo(written, state_dir, container, path, previous)
        raise CniError(E_TRY_LATER, f"node agent not reachable: {exc}") from None
    except OSError as exc:
        _undo(written, state_dir, container, path, previous)
        raise CniError(E_IO, f"cannot write the registration: {exc}") from None
    out = dict(prev)
    out["cniVersion"] = conf.get("cniVersion", prev.get("cniVersion", "1.0.0"))
    return out


def _digest(cfg) -> str:
    from .model.graftconfig import dump_config
    return hashlib.sha256(dump_config(cfg).encode()).hexdigest()


def _undo(written: list[str], state_dir: str, container: str, path: str,
          previous=None) -> None:
    """What a failed ADD wrote, taken back: its configuration (the one it
    replaced put back), then its record."""
    if "config" in written:
        if previous is not None:
            _store(state_dir).save(previous)
        else:
            _store(state_dir).delete(container)
    if "state" in written:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def cmd_del(conf: dict) -> None:
    cid, ifname = _env("CNI_CONTAINERID"), _env("CNI_IFNAME")
    state_dir = _state_dir(conf)
    path = state_path(state_dir, cid, ifname)
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return          # nothing registered (or already deleted): success
    if rec.get("config_written") and isinstance(rec.get("container"), str):
        try:
            store = _store(state_dir)
            stored = store.load(rec["container"])
            # only the configuration this ADD wrote (an ADD killed before it
            # wrote one left the record: the configuration there is another's)
            if stored is not None and rec.get("config_digest") in (None, _digest(stored)):
                store.delete(rec["container"])
        except Exception:  # noqa: BLE001 - DEL must not fail on a bad name
            pass
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        _reload(conf, state_dir, rec.get("container") or "")
    except Exception:  # noqa: BLE001 - the agent may be restarting: files are the truth
        pass


def cmd_check(conf: dict) -> None:
    cid, netns, ifname = _env("CNI_CONTAINERID"), _env("CNI_NETNS"), _env("CNI_IFNAME")
    state_dir = _state_dir(conf)
    try:
        with open(state_path(state_dir, cid, ifname)) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        raise CniError(E_UNKNOWN_CONTAINER, f"container {cid} is not registered") from None
    if rec.get("netns") != netns:
        raise CniError(E_INVALID_CONFIG, f"registered with netns {rec.get('netns')}, "
                                         f"not {netns}")
    if "graft" in conf and not _store(state_dir).load(rec.get("container", "")):
        raise CniError(E_INVALID_CONFIG, "its graft configuration is missing from the store")


def _fail(err: CniError, version: str) -> NoReturn:
    json.dump({"cniVersion": version, "code": err.code, "msg": err.msg,
               "details": err.details}, sys.stdout)
    sys.stdout.write("\n")
    sys.exit(1)


def main() -> None:
    cmd = os.environ.get("CNI_COMMAND", "")
    raw = sys.stdin.read() if cmd != "VERSION" or not sys.stdin.isatty() else ""
    version = "1.0.0"
    try:
        if cmd == "VERSION":
            json.dump({"cniVersion": version, "supportedVersions": SUPPORTED}, sys.stdout)
            sys.stdout.write("\n")
            return
        try:
            conf = json.loads(raw)
        except ValueError as exc:
            raise CniError(E_DECODE, f"network configuration is not JSON: {exc}") from None
        if not isinstance(conf, dict):
            raise CniError(E_DECODE, "network configuration is not an object")
        version = str(conf.get("cniVersion", version))
        if version not in SUPPORTED:
            raise CniError(E_INCOMPATIBLE, f"cniVersion {version} unsupported",
                           f"supported: {', '.join(SUPPORTED)}")
        if cmd == "ADD":
            json.dump(cmd_add(conf), sys.stdout)
            sys.stdout.write("\n")
        elif cmd == "DEL":
            cmd_del(conf)
        elif cmd == "CHECK":
            cmd_check(conf)
        elif cmd == "GC" or cmd == "STATUS":
            return
        else:
            raise CniError(E_INVALID_ENV, f"CNI_COMMAND {cmd!r} unknown")
    except CniError as err:
        _fail(err, version)


if __name__ == "__main__":
    main()
