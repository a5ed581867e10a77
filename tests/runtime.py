"""Real OCI runtime + CNI for the integration tests: a busybox-static rootfs,
OCI bundles, runc, and the reference CNI plugins invoked exactly as a runtime
invokes them (CNI_* environment, network configuration on stdin, each
plugin's result as the next one's prevResult, DEL in reverse order)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from sockgraft.kernel import netns

CNI_BIN = "/usr/lib/cni"
VENV_BIN = os.path.dirname(sys.executable)
BUSYBOX_APPLETS = ("sh", "httpd", "wget", "nc", "sleep", "cat", "echo", "ls", "ip", "true")


def build_rootfs(path):
    """A minimal rootfs: static busybox and its applets, a web root."""
    for d in ("bin", "proc", "sys", "dev", "tmp", "etc", "www"):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    shutil.copy2(shutil.which("busybox") or "/bin/busybox", os.path.join(path, "bin/busybox"))
    for a in BUSYBOX_APPLETS:
        link = os.path.join(path, "bin", a)
        if not os.path.lexists(link):
            os.symlink("busybox", link)
    with open(os.path.join(path, "www/index.html"), "w") as f:
        f.write("hello from a grafted runc container\n")
    with open(os.path.join(path, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/:/bin/sh\n")
    return path


# Docker's default capability set (moby oci/caps/defaults.go)
DOCKER_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
               "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
               "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


def oci_config(rootfs, args, netns_path, seccomp=None, annotations=None, caps=None):
    """An OCI runtime config (spec 1.0.2) for a runc container joining an
    existing network namespace, with the sockgraft seccomp profile. caps:
    the capability list (default: a small set; DOCKER_CAPS or [] for the
    adversarial tests)."""
    if caps is None:
        caps = ["CAP_NET_BIND_SERVICE", "CAP_KILL", "CAP_AUDIT_WRITE"]
    cfg = {
        "ociVersion": "1.0.2",
        "process": {"terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
                    "capabilities": {k: caps for k in ("bounding", "effective", "permitted",
                                                        "ambient")},
                    "noNewPrivileges": True},
        "root": {"path": rootfs, "readonly": False},
        "hostname": "sgc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid"]},
        ],
        "annotations": annotations or {},
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "mount"}, {"type": "network", "path": netns_path}],
            "maskedPaths": ["/proc/kcore"],
            "readonlyPaths": ["/proc/sys"],
        },
    }
    if seccomp is not None:
        cfg["linux"]["seccomp"] = seccomp
    return cfg


class Runc:
    def __init__(self, root):
        self.root = root
        self.exe = shutil.which("runc")

    def _cmd(self, *args):
        return [self.exe, "--root", self.root, *args]

    def run_detached(self, cid, bundle, out_path):
        with open(out_path, "ab") as out:
            p = subprocess.run(self._cmd("run", "--detach", "--bundle", bundle, cid),
                               stdin=subprocess.DEVNULL, stdout=out, stderr=out, timeout=30)
        if p.returncode != 0:
            with open(out_path) as f:
                raise AssertionError(f"runc run {cid} failed: {f.read()[-2000:]}")

    def run_foreground(self, cid, bundle, out_path):
        """`runc run` without --detach: runc stays with the container (and,
        before runc 1.4, keeps its connection to the listener socket open)."""
        with open(out_path, "ab") as out:
            return subprocess.Popen(self._cmd("run", "--bundle", bundle, cid),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out)

    def state(self, cid):
        p = subprocess.run(self._cmd("state", cid), capture_output=True, text=True, timeout=10)
        return json.loads(p.stdout) if p.returncode == 0 else None

    def wait_stopped(self, cid, timeout=15):
        deadline = time.monotonic() + timeout
        while True:
            st = self.state(cid)
            if st is None or st["status"] == "stopped":
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"{cid} still {st['status']}")
            time.sleep(0.1)

    def kill_and_delete(self, cid):
        subprocess.run(self._cmd("kill", cid, "KILL"), capture_output=True, timeout=10)
        try:
            self.wait_stopped(cid)
        except AssertionError:
            pass
        subprocess.run(self._cmd("delete", "--force", cid), capture_output=True, timeout=10)


class RuncEnv:
    """runc containers in a lab host's namespace, networked by CNI, started with
    the profile `sockgraft oci-profile` writes (graft_at chooses which)."""

    def __init__(self, glab, tmp, graft_at="syscall", extra_files=None, conf=None,
                 profile_args=()):
        if shutil.which("runc") is None:
            pytest.fail("runc is not installed (./run installs it)")
        self.g = glab
        self.tmp = tmp
        self.h1 = glab.plan.node("h1")
        self.rootfs = build_rootfs(str(tmp / "rootfs"))
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, os.path.join(self.rootfs, "bin", name))
        self.runc = Runc(str(tmp / "runc-root"))
        self.listener = glab.oci_socket("h1")
        prof = glab.sg("oci-profile", "--listener", self.listener, "--graft-at",
                       graft_at, *profile_args).stdout
        self.profile = json.loads(prof)
        self.cni = Cni(conf or conflist(glab.state_dir, tmp / "ipam",
                                        agentSocket=glab.agent_socket("h1")), self.h1.netns)
        self.containers = {}       # cid -> (netns name, CNI result)
        self.cni_ids = {}          # cid -> the id CNI ADD was called with
        self.foreground = {}       # cid -> the `runc run` process in the foreground

    def start(self, cid, args, annotations, caps=None, foreground=False, runtime=None,
              cni_id=None):
        """runtime: CNI runtimeConfig (e.g. {"portMappings": [...]}). cni_id:
        the id CNI ADD is called with (a pod sandbox's: Kubernetes-like)."""
        ns = f"sg-{self.g.plan.name}-r{len(self.containers)}"
        netns.create(ns)
        try:
            result = self.cni.add(cni_id or cid, netns.path(ns), runtime)
        except BaseException:
            netns.delete(ns)
            raise
        self.containers[cid] = (ns, result, runtime)
        self.cni_ids[cid] = cni_id or cid
        bundle = self.tmp / f"bundle-{cid}"
        bundle.mkdir()
        with open(bundle / "config.json", "w") as f:
            json.dump(oci_config(self.rootfs, args, netns.path(ns), self.profile, annotations,
                                 caps), f)
        if foreground:
            self.foreground[cid] = self.runc.run_foreground(cid, str(bundle),
                                                            str(self.tmp / f"{cid}.out"))
        else:
            self.runc.run_detached(cid, str(bundle), str(self.tmp / f"{cid}.out"))
        return result

    def output(self, cid):
        with open(self.tmp / f"{cid}.out") as f:
            return f.read()

    def stop(self, cid):
        ns, result, runtime = self.containers.pop(cid)
        self.runc.kill_and_delete(cid)
        fg = self.foreground.pop(cid, None)
        if fg is not None:
            try:
                fg.wait(10)
            except subprocess.TimeoutExpired:
                fg.kill()
                fg.wait()
        errors = self.cni.delete(self.cni_ids.pop(cid, cid), netns.path(ns), result, runtime)
        netns.delete(ns)
        return errors

    def close(self):
        for cid in list(self.containers):
            self.stop(cid)


class Cni:
    """A conflist executed like libcni does, inside `host_ns` (where the
    bridge and the host side of the veth go)."""

    def __init__(self, conflist, host_ns, path=(CNI_BIN, VENV_BIN)):
        self.conflist = conflist
        self.host_ns = host_ns
        self.path = ":".join(path)

    def _exec(self, plugin, command, cid, netns_path, prev, ifname="eth0", runtime=None):
        conf = {"cniVersion": self.conflist["cniVersion"], "name": self.conflist["name"],
                **plugin}
        # libcni: runtimeConfig carries what the plugin declared a capability for
        wanted = {k: v for k, v in (runtime or {}).items()
                  if plugin.get("capabilities", {}).get(k)}
        if wanted:
            conf["runtimeConfig"] = wanted
        if prev is not None:
            conf["prevResult"] = prev
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns_path,
               "CNI_IFNAME": ifname, "CNI_PATH": self.path, "PATH": os.environ["PATH"],
               "SOCKGRAFT_STATE_DIR": os.environ.get("SOCKGRAFT_STATE_DIR", "")}
        exe = next(os.path.join(d, plugin["type"]) for d in self.path.split(":")
                   if os.path.exists(os.path.join(d, plugin["type"])))
        ns = self.host_ns
        p = subprocess.run([exe], input=json.dumps(conf), env=env, capture_output=True,
                           text=True, timeout=30, preexec_fn=lambda: netns.enter(ns))
        return p

    def add(self, cid, netns_path, runtime=None):
        prev = None
        for plugin in self.conflist["plugins"]:
            p = self._exec(plugin, "ADD", cid, netns_path, prev, runtime=runtime)
            if p.returncode != 0:
                raise CniFailed(plugin["type"], p.stdout + p.stderr)
            prev = json.loads(p.stdout)
        return prev

    def delete(self, cid, netns_path, prev=None, runtime=None):
        errors = []
        for plugin in reversed(self.conflist["plugins"]):
            p = self._exec(plugin, "DEL", cid, netns_path, prev, runtime=runtime)
            if p.returncode != 0:
                errors.append(f"{plugin['type']}: {p.stdout}{p.stderr}")
        return errors

    def check(self, cid, netns_path, prev):
        return [self._exec(pl, "CHECK", cid, netns_path, prev) for pl in self.conflist["plugins"]]


class CniFailed(Exception):
    def __init__(self, plugin, output):
        super().__init__(f"{plugin}: {output}")
        self.plugin, self.output = plugin, output


def conflist(state_dir, ipam_dir, subnet="198.19.101.0/24", graft=None, bridge="sgcni0",
             portmap=False, **extra):
    """bridge + host-local, [portmap,] sockgraft-cni. portmap: published ports
    through the reference portmap plugin, which sockgraft-cni receives too."""
    sg = {"type": "sockgraft-cni", "stateDir": str(state_dir)}   # agentSocket= in extra
    if portmap:
        sg["capabilities"] = {"portMappings": True}
    if graft is not None:
        sg["graft"] = graft
    sg.update(extra)
    plugins = [{"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
                "ipam": {"type": "host-local", "dataDir": str(ipam_dir),
                         "ranges": [[{"subnet": subnet}]],
                         "routes": [{"dst": "0.0.0.0/0"}]}}]
    if portmap:
        plugins.append({"type": "portmap", "capabilities": {"portMappings": True},
                        "snat": True})
    return {"cniVersion": "1.0.0", "name": "sgtest", "plugins": plugins + [sg]}
