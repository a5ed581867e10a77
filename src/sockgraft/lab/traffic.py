"""Run real traffic tools (iperf3) between lab nodes.

Servers and clients are started as processes that enter the node's namespace
just before exec (never by switching this process). Every run is bounded in
time and cleans up its server.
Must not: decide which nodes talk (model/paths does).
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from ..errors import KernelError
from ..kernel import netns
from ..model.paths import PathSpec


@dataclass(frozen=True)
class Place:
    """Where a traffic process runs: a namespace, optionally grafted through
    `sockgraft run --container` (which enters the container namespace itself)."""
    netns: str
    graft: str | None = None
    lab: str = "demo"
    graft_at: str | None = None     # None: the container's configured graft_at
    wrap: tuple[str, ...] = ()      # a command that runs argv (bench's trapfloor), ungrafted

    def command(self, argv: list[str]) -> list[str]:
        if self.graft is None:
            return [*self.wrap, *argv]
        extra = ["--graft-at", self.graft_at] if self.graft_at else []
        return [sys.executable, "-m", "sockgraft.cli.main", "run", "--container", self.graft,
                "--lab", self.lab, *extra, "--"] + argv

    def preexec(self):
        if self.graft is not None:
            return None
        ns = self.netns
        return lambda: netns.enter(ns)


def popen_in(place: Place | str, argv: list[str], **kw) -> subprocess.Popen:
    place = Place(place) if isinstance(place, str) else place
    return subprocess.Popen(place.command(argv), preexec_fn=place.preexec(), **kw)


def run_in(place: Place | str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    place = Place(place) if isinstance(place, str) else place
    return subprocess.run(place.command(argv), preexec_fn=place.preexec(), capture_output=True,
                          text=True, timeout=timeout)


def wait_listening(ns_name: str, port: int, timeout: float = 5.0, proto: str = "tcp") -> None:
    """Poll the namespace's listeners (ss) until port is bound (TCP listen or UDP bind)."""
    flags = "-Htln" if proto == "tcp" else "-Huln"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run_in(ns_name, ["ss", flags, f"sport = :{port}"], timeout=5).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise KernelError("wait for listener", errno.ETIMEDOUT, f"{ns_name} port {port}")


def iperf3(server: Place, server_port: int, client: Place, target: str, target_port: int,
           seconds: float = 2.0, listen: tuple[str, int] | None = None, name: str = "",
           ready=None) -> dict:
    """One iperf3 TCP single-stream run; returns `gbit_per_s` (receiver side),
    `bytes` and the raw JSON text. `listen` is (netns, port) where the server's
    socket really listens (a grafted server listens on the host side)."""
    if not shutil.which("iperf3"):
        raise KernelError("iperf3", errno.ENOENT, "iperf3 is not installed")
    srv = popen_in(server, ["iperf3", "-s", "-1", "-p", str(server_port)],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_listening(*(listen or (server.netns, server_port)))
        if ready is not None:
            ready()          # e.g. until the directory published the server
        # iperf3 takes whole seconds; 0 would mean "forever"
        secs = max(1, math.ceil(seconds))
        proc = run_in(client, ["iperf3", "-c", target, "-p", str(target_port),
                               "-t", str(secs), "-J"], timeout=secs + 30)
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            data = {"error": (proc.stdout + proc.stderr)[-500:]}
        if proc.returncode != 0 or "error" in data:
            raise KernelError("iperf3 client", errno.EIO,
                              f"{name}: {data.get('error', proc.stderr[-500:])}")
        recv = data["end"]["sum_received"]
        return {"gbit_per_s": recv["bits_per_second"] / 1e9, "bytes": recv["bytes"],
                "raw": proc.stdout}
    finally:
        _stop(srv)


def iperf3_path(path: PathSpec, server_ns: str, client_ns: str, seconds: float = 2.0) -> dict:
    return iperf3(Place(server_ns), path.server_port, Place(client_ns), path.target,
                  path.target_port, seconds, name=path.name)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
