"""Test harness for the grafting engine: a lab with one real agent per host,
and helpers to run unmodified programs grafted inside its containers."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

from sockgraft.agent import control
from sockgraft.kernel import netns
from sockgraft.lab import builder

HERE = os.path.dirname(os.path.abspath(__file__))
PROBE = [sys.executable, os.path.join(HERE, "apps", "sockprobe.py")]
SG = [sys.executable, "-m", "sockgraft.cli.main"]


class GraftLab:
    def __init__(self, plan, state_dir):
        self.plan = plan
        self.state_dir = str(state_dir)
        self.env = dict(os.environ, SOCKGRAFT_STATE_DIR=self.state_dir)
        self.agents = {}
        self.procs = []

    # --- agents --------------------------------------------------------------
    def agent_socket(self, host):
        return os.path.join(self.state_dir, f"agent-{self.plan.name}-{host}.sock")

    def set_native(self, host, on):
        """Sessions that start from now on are answered by the agent's native
        loop (on) or by Python (the agent's control op `native`)."""
        assert control.request(self.agent_socket(host), {"op": "native", "on": on})["ok"]

    def oci_socket(self, host):
        return os.path.join(self.state_dir, f"oci-{self.plan.name}-{host}.sock")

    def audit_path(self, host):
        return os.path.join(self.state_dir, f"audit-{self.plan.name}-{host}.log")

    def start_agent(self, host, *extra):
        return self.start_agents((host, *extra))[host]

    def start_agents(self, *specs):
        """Start agents ((host, *args) each) at once, then wait until each
        answers: their start-up (about a second each) overlaps."""
        procs = {}
        for host, *extra in specs:
            log = open(self._log_path(host), "ab")
            procs[host] = subprocess.Popen(
                SG + ["agent", "--host", host, "--lab", self.plan.name,
                      "--audit-log", self.audit_path(host), *extra],
                env=self.env, stdout=log, stderr=log)
            log.close()
        deadline = time.monotonic() + 30
        for host, p in procs.items():
            while True:
                try:
                    control.request(self.agent_socket(host), {"op": "ping"}, timeout=1)
                    break
                except Exception:
                    if p.poll() is not None or time.monotonic() > deadline:
                        for q in procs.values():
                            if q.poll() is None:
                                q.kill()
                                q.wait()
                        raise RuntimeError(f"agent {host} did not start (rc={p.poll()}): "
                                           f"{self.agent_log(host)} {_where(p.pid)}")
                    time.sleep(0.05)
            self.agents[host] = p
        return procs

    def stop_agent(self, host, sig=signal.SIGTERM):
        p = self.agents.pop(host)
        p.send_signal(sig)
        p.wait(timeout=10)

    def _log_path(self, host):
        return os.path.join(self.state_dir, f"agent-{self.plan.name}-{host}.log")

    def agent_log(self, host):
        try:
            with open(self._log_path(host)) as f:
                return f.read()
        except OSError:
            return ""

    def audit(self, host):
        try:
            with open(self.audit_path(host)) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def agent_fds(self, host):
        return len(os.listdir(f"/proc/{self.agents[host].pid}/fd"))

    def rss_kib(self, host):
        with open(f"/proc/{self.agents[host].pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    # --- configuration -------------------------------------------------------
    def sg(self, *args, check=True, timeout=30):
        proc = subprocess.run(SG + list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"sockgraft {' '.join(args)} failed: {proc.stderr}")
        return proc

    def configure(self, container, toml_text):
        path = os.path.join(self.state_dir, f"{container}.toml")
        with open(path, "w") as f:
            f.write(toml_text)
        self.sg("config", "load", path)

    # --- programs ------------------------------------------------------------
    def run(self, container, argv, timeout=30, options=()):
        """Run argv grafted in a container; returns (returncode, parsed JSON lines, stderr)."""
        proc = subprocess.run(SG + ["run", "--container", container, "--lab", self.plan.name,
                                    *options, "--"] + argv, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        return proc.returncode, _json_lines(proc.stdout), proc.stderr

    def probe(self, container, *args, timeout=30):
        rc, lines, err = self.run(container, PROBE + [str(a) for a in args], timeout)
        assert rc == 0, f"probe failed rc={rc}: {err}\n{self.agent_log(self.host_of(container))}"
        assert lines, f"probe printed nothing: {err}"
        return lines[-1]

    def spawn(self, container, argv, options=()):
        """Start a grafted program in the background (stdout is JSON lines)."""
        p = subprocess.Popen(SG + ["run", "--container", container, "--lab", self.plan.name,
                                   *options, "--"] + argv, env=self.env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(p)
        return p

    def spawn_plain(self, node, argv):
        """Start a program in a node's namespace without grafting."""
        ns = self.plan.node(node).netns
        argv = [str(a) for a in argv]
        p = subprocess.Popen(argv, preexec_fn=lambda: netns.enter(ns), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(p)
        return p

    def services(self, host="h1"):
        import json as _json
        out = self.sg("services", "--json", "--agent", self.agent_socket(host)).stdout
        return _json.loads(out)

    def wait_services(self, pred, host="h1", timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            got = self.services(host)
            if pred(got["services"]) or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    def counters(self, node):
        return builder.interface_counters(self.plan.node(node).netns)

    def host_of(self, container):
        return self.plan.node(container).host

    def veth_rx(self, container):
        c = self.plan.node(container)
        host = self.plan.node(c.host)
        return builder.interface_counters(host.netns)[c.veth_host]["rx_bytes"]

    def close(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
            for pipe in (p.stdin, p.stdout, p.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()
        for host in list(self.agents):
            self.stop_agent(host)


@contextlib.contextmanager
def agents_on(plan, state_dir):
    """A GraftLab with an agent started on each host of `plan`; stopped after."""
    g = GraftLab(plan, state_dir)
    try:
        g.start_agents(*((h.name,) for h in plan.hosts))
        yield g
    finally:
        g.close()


@contextlib.contextmanager
def shared_lab(tmp_path_factory, prefix, *agents):
    """One default lab (and its agents: (host, *args) tuples) for the tests
    of a module that leave it as they found it; its own state directory.
    Saves the lab and agent start of every test (about 2 s each)."""
    import secrets
    if os.geteuid() != 0:
        import pytest
        pytest.skip("needs root for network namespaces")
    d = tmp_path_factory.mktemp(prefix)
    old = os.environ.get("SOCKGRAFT_STATE_DIR")
    os.environ["SOCKGRAFT_STATE_DIR"] = str(d)
    try:
        with default_lab(prefix[0] + secrets.token_hex(4)) as plan:
            g = GraftLab(plan, d)
            try:
                g.start_agents(*agents)
                yield g
            finally:
                g.close()
    finally:
        if old is None:
            os.environ.pop("SOCKGRAFT_STATE_DIR", None)
        else:
            os.environ["SOCKGRAFT_STATE_DIR"] = old


@contextlib.contextmanager
def default_lab(name):
    """The default topology brought up as lab `name`; torn down afterwards,
    failing if it left namespaces, BPF pins or cgroups behind."""
    from sockgraft.kernel import bpf, netns
    from sockgraft.lab import builder
    from sockgraft.model.topology import default_text, parse_topology
    plan = parse_topology(default_text(), name=name)
    builder.up(plan, default_text(), "<default>")
    try:
        yield plan
    finally:
        builder.down(name)
        left = [n for n in netns.list_names() if n.startswith(f"sg-{name}-")]
        assert not left, f"lab left namespaces behind: {left}"
        bpf_left = [p for h in plan.hosts for p in bpf.leftovers(f"{name}-{h.name}")]
        assert not bpf_left, f"lab left BPF pins or cgroups behind: {bpf_left}"


def pid_of_child(launcher_pid, timeout=10):
    """The grafted program `sockgraft run` (launcher_pid) started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{launcher_pid}/task/{launcher_pid}/children") as f:
                kids = f.read().split()
            if kids:
                return int(kids[0])
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("the grafted program did not start")


def steal_socket(launcher, fd):
    """A copy of the grafted program's fd in this process (pidfd_getfd, as a
    process the container passed it to over SCM_RIGHTS would hold it)."""
    import socket
    from sockgraft.kernel import seccomp
    pidfd = seccomp.pidfd_open(pid_of_child(launcher.pid))
    try:
        return socket.socket(fileno=seccomp.pidfd_getfd(pidfd, fd))
    finally:
        os.close(pidfd)


def read_json_line(proc, timeout=10):
    """The next JSON line of proc's stdout. Reads the fd itself and keeps what
    follows the line: select() on a buffered pipe object would not see the
    lines its buffer already holds, and wait for nothing."""
    import select
    fd = proc.stdout.fileno()
    buf = getattr(proc, "_json_buf", b"")
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError("no output from the process in time")
        chunk = os.read(fd, 65536)
        if not chunk:
            raise AssertionError(f"process ended: {proc.stderr.read()}")
        buf += chunk
    line, _, proc._json_buf = buf.partition(b"\n")
    return json.loads(line)


def _json_lines(text):
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _where(pid):
    """What a stuck process is doing (kernel stack, wchan), for failure messages."""
    out = []
    for name in ("wchan", "stack"):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                out.append(f"{name}: {f.read().strip()[:600]}")
        except OSError:
            pass
    return " | ".join(out)


def build_go(tmp_path, source: str, name: str = "prog") -> str:
    """go build of one main.go (static: CGO_ENABLED=0), offline; skips the
    test when go is not installed. Returns the binary's path."""
    import shutil
    import pytest
    go = shutil.which("go")
    if not go:
        pytest.skip("go is not installed (apt-get install golang-go)")
    src = tmp_path / f"{name}-src"
    src.mkdir()
    (src / "main.go").write_text(source)
    (src / "go.mod").write_text("module sgtest\n\ngo 1.19\n")
    env = dict(os.environ, CGO_ENABLED="0", GOFLAGS="", GOPROXY="off", GOTOOLCHAIN="local",
               GOCACHE=str(tmp_path / "gocache"), GOPATH=str(tmp_path / "gopath"),
               GO111MODULE="on", GOWORK="off")
    prog = tmp_path / name
    proc = subprocess.run([go, "build", "-o", str(prog), "."], cwd=src, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"go build failed: {proc.stderr[-2000:]}"
    return str(prog)
