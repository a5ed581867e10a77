"""Start the node agents of a lab (`lab up --agents`, the demo, the benchmarks).

Each agent runs detached in its host's namespace with its log and audit file
in the state directory. `lab down` stops them like any process left in the
lab's namespaces (SIGTERM, then SIGKILL), which also removes their sockets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ..agent import control
from ..errors import AgentError
from ..model.topology import LabPlan
from ..paths import state_dir


state_base = state_dir


def start_agents(plan: LabPlan, timeout: float = 15.0,
                 config_dir: str | None = None, agent_args: tuple[str, ...] = ()
                 ) -> dict[str, int]:
    """Start one agent per host; returns {host: pid}. Waits until each answers.
    Sockets, logs and audit files are named by lab and host. agent_args: more
    `sockgraft agent` options (e.g. --sockmap auto)."""
    os.makedirs(state_base(), exist_ok=True)
    pids = {}
    for host in plan.hosts:
        name = control.agent_name(host.name, plan.name)
        path = control.default_socket_path(host.name, plan.name)
        if answers(path):
            raise AgentError(f"an agent already serves {path}")
        log_path = os.path.join(state_base(), f"agent-{name}.log")
        extra = (["--config-dir", config_dir] if config_dir else []) + list(agent_args)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sockgraft.cli.main", "agent", "--host", host.name,
                 "--lab", plan.name, "--audit-log",
                 os.path.join(state_base(), f"audit-{name}.log"), *extra],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        pids[host.name] = proc.pid
        deadline = time.monotonic() + timeout
        while not answers(path):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AgentError(f"the agent of {host.name} did not start; see {log_path}")
            time.sleep(0.05)
    return pids


def answers(path: str) -> bool:
    try:
        control.request(path, {"op": "ping"}, timeout=1)
        return True
    except AgentError:
        return False


def wait_published(lab: str, host: str, proto: str, overlay: str, port: int,
                   timeout: float = 10) -> None:
    """Until the agent of lab host `host` knows a grafted server by its overlay
    address in the directory (~0.1 s with the embedded one)."""
    path = control.default_socket_path(host, lab)
    deadline = time.monotonic() + timeout
    while True:
        got = control.request(path, {"op": "services"}, timeout=2)
        if any(r["overlay"] == overlay and r["port"] == port and r["proto"] == proto
               for r in got.get("records", [])):
            return
        if time.monotonic() > deadline:
            raise AgentError(f"the directory never published {proto} {overlay}:{port}")
        time.sleep(0.05)
