"""Run real traffic tools (iperf3) between lab nodes.

Servers and clients are started as processes that enter the node's namespace
just before exec (never by switching this process). Every run is bounded in
time and cleans up its server.
Must not: decide which nodes talk (model/paths does).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time

from ..errors import KernelError
from ..kernel import netns
from ..model.paths import PathSpec


def popen_in(ns_name: str, argv: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(argv, preexec_fn=lambda: netns.enter(ns_name), **kw)


def run_in(ns_name: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(argv, preexec_fn=lambda: netns.enter(ns_name), capture_output=True,
                          text=True, timeout=timeout)


def wait_listening(ns_name: str, port: int, timeout: float = 5.0) -> None:
    """Poll the namespace's TCP listeners (ss) until port is bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = run_in(ns_name, ["ss", "-Htln", f"sport = :{port}"], timeout=5).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise KernelError("wait for listener", errno.ETIMEDOUT, f"{ns_name} port {port}")


def iperf3(path: PathSpec, server_ns: str, client_ns: str, seconds: float = 2.0) -> dict:
    """One iperf3 TCP single-stream run; returns the parsed JSON summary plus
    `gbit_per_s` (receiver side) and the raw JSON text."""
    if not shutil.which("iperf3"):
        raise KernelError("iperf3", errno.ENOENT, "iperf3 is not installed")
    server = popen_in(server_ns, ["iperf3", "-s", "-1", "-p", str(path.server_port)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(server_ns, path.server_port)
        proc = run_in(client_ns, ["iperf3", "-c", path.target, "-p", str(path.target_port),
                                  "-t", str(seconds), "-J"], timeout=seconds + 20)
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            data = {"error": (proc.stdout + proc.stderr)[-500:]}
        if proc.returncode != 0 or "error" in data:
            raise KernelError("iperf3 client", errno.EIO,
                              f"{path.name}: {data.get('error', proc.stderr[-500:])}")
        bps = data["end"]["sum_received"]["bits_per_second"]
        return {"gbit_per_s": bps / 1e9, "raw": proc.stdout}
    finally:
        if server.poll() is None:
            server.terminate()
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
