"""The agent's OCI image, built by deploy/image/build.sh from Debian packages
and the project's wheel, unpacked with umoci and run under runc the way the
DaemonSet runs it (privileged, host PID namespace, the node's network
namespace - here a lab host's), then a runc container grafted through it:
its seccomp listener handed to the image's agent, its CNI ADD done by the
image's zipapp plugin under the node's own python3.

About a minute to build (mmdebstrap fetches from the machine's apt sources);
`-m "not slow"` leaves it out."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from grafting import GraftLab
from nettools import http_get
from runtime import CNI_BIN, Cni, Runc, RuncEnv, conflist
from sockgraft.agent import control
from sockgraft.kernel import bpf as kbpf
from sockgraft.kernel import netns
from sockgraft.lab.traffic import wait_listening

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
WEB_ANN = {"sockgraft/endpoints": "ep-http=ipv4:198.18.0.1:8081",
           "sockgraft/ingress": "0.0.0.0:80=ep-http"}
CAP_NAMES = ["CAP_" + c for c in (      # in bit order
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP "
    "LINUX_IMMUTABLE NET_BIND_SERVICE NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER "
    "SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT SYS_ADMIN SYS_BOOT SYS_NICE "
    "SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF "
    "CHECKPOINT_RESTORE").split()]


def _bounding_caps():
    """What `privileged` grants: every capability this node's root has (its
    bounding set may lack some, e.g. CAP_SYS_RESOURCE on this VM)."""
    with open("/proc/self/status") as f:
        bnd = int(next(line.split()[1] for line in f if line.startswith("CapBnd:")), 16)
    return [name for bit, name in enumerate(CAP_NAMES) if bnd >> bit & 1]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    for tool in ("mmdebstrap", "umoci", "runc"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (./run installs it)")
    out = tmp_path_factory.mktemp("image")
    p = subprocess.run(["bash", os.path.join(ROOT, "deploy", "image", "build.sh"),
                        "-o", str(out), "-p", sys.executable],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"the image build failed:\n{p.stderr[-4000:]}"
    import sockgraft
    tag = sockgraft.__version__
    assert f"built localhost/sockgraft/agent:{tag}" in p.stderr
    return {"layout": str(out / "layout"), "tag": tag,
            "archive": str(out / f"sockgraft-agent-{tag}.oci.tar")}


def test_image_layout_and_archive(image):
    """The layout is a valid OCI image the tools name as the DaemonSet does."""
    with open(os.path.join(image["layout"], "index.json")) as f:
        index = json.load(f)
    (m,) = index["manifests"]
    assert m["annotations"]["org.opencontainers.image.ref.name"] == image["tag"]
    assert m["annotations"]["io.containerd.image.name"] == \
        f"localhost/sockgraft/agent:{image['tag']}"
    ls = subprocess.run(["umoci", "ls", "--layout", image["layout"]], capture_output=True,
                        text=True, timeout=30)
    assert ls.stdout.split() == [image["tag"]]
    st = subprocess.run(["umoci", "stat", "--image", f"{image['layout']}:{image['tag']}",
                         "--json"], capture_output=True, text=True, timeout=30)
    assert st.returncode == 0, st.stderr
    listing = subprocess.run(["tar", "-tf", image["archive"]], capture_output=True,
                             text=True, timeout=60).stdout.split()
    assert "./index.json" in listing and "./oci-layout" in listing


@pytest.fixture
def image_bundle(image, tmp_path):
    bundle = tmp_path / "bundle"
    p = subprocess.run(["umoci", "unpack", "--image", f"{image['layout']}:{image['tag']}",
                        str(bundle)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return bundle


def _agent_config(bundle, netns_path, state_dir, lab):
    """umoci's config.json (the image's entrypoint, env, cwd) turned into
    what the DaemonSet asks for: privileged, host PID namespace, the node's
    network namespace, the state directory and /sys of the node."""
    with open(bundle / "config.json") as f:
        cfg = json.load(f)
    proc = cfg["process"]
    assert proc["args"][:2] == ["sockgraft", "agent"]        # the image's entrypoint + cmd
    proc["args"] += ["--lab", lab, "--host", "h1", "--netns", "/proc/self/ns/net",
                     "--bpf", "on", "--audit-log", os.path.join(state_dir, "audit-image.log")]
    proc["env"].append(f"SOCKGRAFT_STATE_DIR={state_dir}")
    proc["terminal"] = False
    proc["noNewPrivileges"] = False
    proc["capabilities"] = {k: _bounding_caps() for k in ("bounding", "effective", "permitted")}
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    proc["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": hard, "soft": hard}]
    linux = cfg["linux"]
    linux["namespaces"] = [{"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "network", "path": netns_path}]         # no pid: hostPID
    linux["maskedPaths"], linux["readonlyPaths"] = [], []
    linux.pop("resources", None)
    cfg["mounts"] = [m for m in cfg["mounts"]
                     if m["destination"] not in ("/sys", "/sys/fs/cgroup")] + [
        {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind", "rw"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        {"destination": state_dir, "type": "bind", "source": state_dir,      # after /tmp
         "options": ["rbind", "rw"]},
    ]
    with open(bundle / "config.json", "w") as f:
        json.dump(cfg, f)


def test_agent_from_the_image_grafts_a_runc_container(image_bundle, lab, state_dir, tmp_path):
    rootfs = image_bundle / "rootfs"
    assert not (rootfs / "usr/bin/clang").exists()     # the BPF object was built in
    kbpf.ensure_bpffs()                                 # the node's, bound in through /sys
    h1 = lab.node("h1")
    _agent_config(image_bundle, netns.path(h1.netns), str(state_dir), lab.name)
    runc = Runc(str(tmp_path / "runc-root"))
    g = GraftLab(lab, state_dir)
    cid = f"sg-agent-{lab.name}"
    out = tmp_path / "agent.out"
    runc.run_detached(cid, str(image_bundle), str(out))
    rt = None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                pong = control.request(g.agent_socket("h1"), {"op": "ping"}, timeout=1)
                break
            except Exception as exc:   # noqa: BLE001 - not up yet
                assert time.monotonic() < deadline, \
                    f"agent did not start ({exc}): {out.read_text()}"
                assert (runc.state(cid) or {}).get("status") == "running", out.read_text()
                time.sleep(0.2)
        # the agent answering is the image's interpreter, in the node's namespaces
        exe = os.stat(f"/proc/{pong['pid']}/exe")
        real = os.path.realpath(rootfs / "usr/bin/python3")
        assert (exe.st_dev, exe.st_ino) == (os.stat(real).st_dev, os.stat(real).st_ino)
        assert os.readlink(f"/proc/{pong['pid']}/ns/net") == \
            netns.run_in(h1.netns, os.readlink, "/proc/self/ns/net")
        assert os.readlink(f"/proc/{pong['pid']}/ns/pid") == os.readlink("/proc/self/ns/pid")

        # the CNI plugin the init container installs: the image's zipapp, run by
        # the node's python3 outside any venv
        cni_dir = tmp_path / "cni-bin"
        cni_dir.mkdir()
        shutil.copy2(rootfs / "opt/sockgraft/host/sockgraft-cni", cni_dir / "sockgraft-cni")
        (tmp_path / "rt").mkdir()
        rt = RuncEnv(g, tmp_path / "rt")
        rt.cni = Cni(conflist(state_dir, tmp_path / "ipam", agentSocket=g.agent_socket("h1")),
                     h1.netns, path=(CNI_BIN, str(cni_dir)))
        res = rt.start("web", ["/bin/httpd", "-f", "-p", "80", "-h", "/www"], WEB_ANN)
        assert res["ips"][0]["address"].startswith("198.19.101.")
        wait_listening(h1.netns, 8081)                # the container's bind(:80) is grafted
        body = netns.run_in(h1.netns, http_get, "198.18.0.1", 8081)
        assert "hello from a grafted runc container" in body
        socks = json.loads(g.sg("sockets", "--json", "--agent", g.agent_socket("h1")).stdout)
        assert any(s["container"] == "web" and s["kind"] == "ingress" for s in socks), socks
        assert rt.stop("web") == []
    finally:
        if rt is not None:
            rt.close()
        subprocess.run([runc.exe, "--root", runc.root, "kill", cid, "TERM"],
                       capture_output=True, timeout=10)
        try:
            runc.wait_stopped(cid, timeout=15)
        except AssertionError:
            pass
        runc.kill_and_delete(cid)
    assert "Traceback" not in out.read_text(), out.read_text()[-3000:]
