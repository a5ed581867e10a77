"""model/oci.py: the runtime hand-off, annotations, and profile merging."""

import json

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model import oci as moci
from sockgraft.model import directory as mdir

pytestmark = pytest.mark.unit

STATE = {"ociVersion": "1.0.2", "fds": ["seccompFd"], "pid": 42, "metadata": "sockgraft:v1;graft_at=socket",
         "state": {"ociVersion": "1.0.2", "id": "web", "status": "creating", "pid": 42,
                   "bundle": "/b", "annotations": {"sockgraft/container": "default.web"}}}


def test_handoff_parses_what_runc_sends():
    h = moci.parse_handoff(json.dumps(STATE).encode(), 1)
    assert (h.container_id, h.pid, h.bundle, h.graft_at, h.fd_index) == ("web", 42, "/b",
                                                                        "socket", 0)
    assert moci.container_name(h) == "default.web"


@pytest.mark.parametrize("mutate, nfds, msg", [
    (lambda s: s, 0, r"fd\(s\) but"),
    (lambda s: s, 2, r"fd\(s\) but"),
    (lambda s: {**s, "fds": ["other"]}, 1, "no seccompFd"),
    (lambda s: {**s, "fds": "seccompFd"}, 1, "list of names"),
    (lambda s: {**s, "pid": 0}, 1, "pid"),
    (lambda s: {**s, "pid": True}, 1, "pid"),
    (lambda s: {**s, "state": []}, 1, "state"),
    (lambda s: {**s, "state": {**s["state"], "id": ""}}, 1, "state.id"),
    (lambda s: {**s, "state": {**s["state"], "annotations": {"a": 1}}}, 1, "annotations"),
])
def test_bad_handoffs_are_refused(mutate, nfds, msg):
    with pytest.raises(ConfigError, match=msg):
        moci.parse_handoff(json.dumps(mutate(STATE)).encode(), nfds)


def test_non_json_and_huge_messages_are_refused():
    with pytest.raises(ConfigError, match="not JSON"):
        moci.parse_handoff(b"\xff{", 1)
    with pytest.raises(ConfigError, match="at most"):
        moci.parse_handoff(b" " * (moci.MAX_HANDOFF + 1), 1)
    with pytest.raises(ConfigError, match="object"):
        moci.parse_handoff(b"[]", 1)


def test_a_message_is_complete_when_its_json_object_is():
    """runc before 1.4 keeps the connection open (`runc run` in the
    foreground): the agent parses as soon as the object is whole."""
    whole = json.dumps(STATE).encode()
    assert moci.message_complete(whole) and moci.message_complete(whole + b"\n")
    for cut in (1, len(whole) // 2, len(whole) - 1):
        assert not moci.message_complete(whole[:cut])
    assert not moci.message_complete(b"")
    assert not moci.message_complete(b'{"a": "}')
    assert moci.message_complete(b"{}")          # complete, and then refused by parse_handoff


def test_annotations_build_a_config():
    cfg = moci.config_from_annotations("web", {
        "sockgraft/endpoints": "ep-http=ipv4:198.18.0.1:8081, ep-out=ipv4:198.18.0.1:dynamic,"
                               "ep6=ipv6:[fd00::1]:80",
        "sockgraft/ingress": "0.0.0.0:80=ep-http",
        "sockgraft/egress": "198.18.0.0/24=ep-out",
        "sockgraft/policy": "deny tcp 10.0.0.0/8 22; allow any any",
        "sockgraft/graft-at": "socket", "other/thing": "ignored"})
    assert cfg.graft_at == "socket" and len(cfg.endpoints) == 3
    assert [str(r) for r in cfg.ingress] == ["0.0.0.0:80=ep-http"]
    assert len(cfg.policy.deny) == 1 and len(cfg.policy.allow) == 1
    assert moci.config_from_annotations("web", {"other/x": "1"}) is None


@pytest.mark.parametrize("ann, where", [
    ({"sockgraft/endpoints": "ep=ipv4:nope:80"}, "nope"),
    ({"sockgraft/endpoints": "ep=ipv4:1.2.3.4:http"}, "http"),
    ({"sockgraft/endpoints": "justaname"}, "NAME=TYPE"),
    ({"sockgraft/ingress": "0.0.0.0:80=missing"}, "missing"),
    ({"sockgraft/graft-at": "sometimes"}, "sometimes"),
    ({"sockgraft/policy": "maybe tcp any"}, "maybe"),
    ({"sockgraft/colour": "red"}, "unknown annotation"),
])
def test_bad_annotations_name_the_problem(ann, where):
    with pytest.raises(ConfigError, match=where):
        moci.config_from_annotations("web", ann)


DOCKERISH = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
             "architectures": ["SCMP_ARCH_X86_64"],
             "syscalls": [{"names": ["accept", "bind", "connect", "listen", "read", "sendto",
                                     "socket"],
                           "action": "SCMP_ACT_ALLOW"},
                          {"names": ["io_uring_setup"], "action": "SCMP_ACT_ALLOW"}]}


def _by_name(prof):
    out = {}
    for r in prof["syscalls"]:
        for n in r["names"]:
            out.setdefault(n, []).append(r)
    return out


def test_merge_into_a_deny_by_default_profile_is_idempotent():
    once = moci.build_profile(DOCKERISH, "/run/sg/oci.sock")
    twice = moci.build_profile(once, "/run/sg/oci.sock")
    assert once == twice
    names = _by_name(once)
    assert [r["action"] for r in names["bind"]] == ["SCMP_ACT_NOTIFY"]
    assert "args" not in names["connect"][0]          # unconditional under deny-default
    assert names["sendto"][0]["action"] == "SCMP_ACT_ALLOW"
    assert names["listen"] == [{"names": ["listen"], "action": "SCMP_ACT_NOTIFY"}]
    assert names["accept"][0]["action"] == "SCMP_ACT_ALLOW" and "read" in names
    assert names["io_uring_setup"] == [{"names": ["io_uring_setup", "io_uring_enter",
                                                  "io_uring_register"],
                                        "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]
    assert moci.check_profile(once) == []


def test_allow_default_profile_traps_with_masked_low_word_comparisons():
    prof = moci.build_profile(None, "/run/sg/oci.sock", "socket")
    names = _by_name(prof)
    assert names["bind"] == [{"names": ["bind"], "action": "SCMP_ACT_NOTIFY"}]
    assert names["listen"] == [{"names": ["listen"], "action": "SCMP_ACT_NOTIFY"}]
    # libseccomp: (arg & value) == valueTwo - the kernel reads an int's low word
    assert names["socket"] == [
        {"names": ["socket"], "action": "SCMP_ACT_NOTIFY",
         "args": [{"index": 0, "value": 0xFFFFFFFF, "valueTwo": fam,
                   "op": "SCMP_CMP_MASKED_EQ"}]} for fam in (2, 10)]
    assert "connect" not in names                      # judged in the kernel
    assert prof["listenerMetadata"] == "sockgraft:v1;graft_at=socket"
    sysc = _by_name(moci.build_profile(None, "/run/sg/oci.sock"))
    assert {(a["value"], a["valueTwo"], a["op"]) for r in sysc["connect"] for a in r["args"]} \
        == {(0xFFFFFFFF, n, "SCMP_CMP_MASKED_EQ") for n in (16, 28, 128)}


def test_check_profile_flags_64_bit_comparisons_and_partial_binds():
    prof = moci.build_profile(None, "/run/sg/oci.sock", "socket")
    bad = json.loads(json.dumps(prof))
    for r in bad["syscalls"]:
        for a in r.get("args", []):
            a["op"], a["value"] = "SCMP_CMP_EQ", a.pop("valueTwo")
    assert any("over 64 bits" in p for p in moci.check_profile(bad))
    partial = json.loads(json.dumps(prof))
    for r in partial["syscalls"]:
        if r["names"] == ["bind"]:
            r["args"] = [{"index": 2, "value": 0xFFFFFFFF, "valueTwo": 16,
                          "op": "SCMP_CMP_MASKED_EQ"}]
    assert "bind is trapped only for some arguments (trap every call)" in \
        moci.check_profile(partial)


def test_a_profile_with_another_listener_is_refused():
    with pytest.raises(ConfigError, match="already sends its notifications"):
        moci.build_profile({**DOCKERISH, "listenerPath": "/run/other.sock"}, "/run/sg/oci.sock")
    with pytest.raises(ConfigError, match="defaultAction"):
        moci.build_profile({"syscalls": []}, "/x")


def rec(owner, container, since, overlay="198.19.2.2", port=80):
    return {"overlay": overlay, "port": port, "proto": "tcp", "host_addr": "198.18.0.2",
            "host_port": 8081, "node": owner, "owner": owner, "container": container,
            "since": since}


def test_directory_merge_first_publisher_wins():
    table, conflicts = mdir.merge({"b": [rec("b", "y", 2.0)], "a": [rec("a", "x", 1.0)]})
    assert table["tcp/198.19.2.2/80"]["container"] == "x"
    assert len(conflicts) == 1 and conflicts[0].loser["container"] == "y"
    assert "may not publish it too" in str(conflicts[0])
    table, conflicts = mdir.merge({"a": [rec("a", "x", 1.0), rec("a", "x", 3.0)]})
    assert table["tcp/198.19.2.2/80"]["since"] == 3.0 and not conflicts


@pytest.mark.parametrize("field, value", [("port", 0), ("port", "80"), ("overlay", "x"),
                                          ("proto", "sctp"), ("host_addr", "fd00::1"),
                                          ("container", "")])
def test_directory_records_are_checked(field, value):
    r = rec("a", "x", 1.0)
    r[field] = value
    with pytest.raises(ConfigError):
        mdir.check_record(r)


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "sockgraft.cli.main", *args],
                          capture_output=True, text=True, timeout=60)


def test_oci_profile_command_merges_idempotently_and_refuses_foreign_listeners(tmp_path):
    base = tmp_path / "base.json"
    base.write_text(json.dumps(DOCKERISH))
    out1, out2 = tmp_path / "one.json", tmp_path / "two.json"
    assert _cli("oci-profile", "--base", str(base), "--listener", "/run/sg/oci.sock",
                "--out", str(out1)).returncode == 0
    assert _cli("oci-profile", "--base", str(out1), "--listener", "/run/sg/oci.sock",
                "--out", str(out2)).returncode == 0
    assert json.loads(out1.read_text()) == json.loads(out2.read_text())
    p = _cli("oci-profile", "--base", str(out1), "--listener", "/run/other.sock")
    assert p.returncode == 2 and "already sends its notifications" in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    p = _cli("oci-profile", "--base", str(bad))
    assert p.returncode == 2 and "not JSON" in p.stderr and str(bad) in p.stderr


def test_syscall_mode_profiles_trap_epoll_create_unless_told_not_to():
    """An epoll instance made just before a connect() must be seen by the
    agent (it carries the socket's registration over the graft): syscall
    mode traps epoll_create(1) unconditionally where the base lets them
    through, taking them out of the base's rules (one rule per syscall);
    --no-trap-epoll and socket mode do not, and a re-merge without it drops
    the earlier traps. A base that refuses one (here: epoll_create, not
    listed under a refusing default) keeps refusing it - a trap the agent
    continues would let it through."""
    base = {**DOCKERISH, "syscalls": DOCKERISH["syscalls"] + [
        {"names": ["epoll_create1", "epoll_wait"], "action": "SCMP_ACT_ALLOW"}]}
    prof = moci.build_profile(base, "/run/sg/oci.sock")
    names = _by_name(prof)
    assert names["epoll_create1"] == [{"names": ["epoll_create1"], "action": "SCMP_ACT_NOTIFY"}]
    assert "epoll_create" not in names, names.get("epoll_create")     # refused by default
    assert names["epoll_wait"][0]["action"] == "SCMP_ACT_ALLOW"
    assert moci.build_profile(prof, "/run/sg/oci.sock") == prof
    assert "epoll_create1" not in _by_name(moci.build_profile(None, "/x", "socket"))
    plain = _by_name(moci.build_profile(base, "/x", trap_epoll=False))
    assert [r["action"] for r in plain["epoll_create1"]] == ["SCMP_ACT_ALLOW"]
    again = moci.build_profile(prof, "/run/sg/oci.sock", trap_epoll=False)
    assert [r["action"] for r in _by_name(again)["epoll_create1"]] == ["SCMP_ACT_ALLOW"]
    assert "epoll_create" not in _by_name(again)       # as the base had them
    assert moci.build_profile(again, "/run/sg/oci.sock", trap_epoll=False) == again


@pytest.mark.parametrize("default, rule", [
    ("SCMP_ACT_ALLOW", {"names": ["epoll_create"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}),
    ("SCMP_ACT_ALLOW", {"names": ["epoll_create"], "action": "SCMP_ACT_ERRNO",
                        "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}),
    ("SCMP_ACT_ERRNO", {"names": ["epoll_create"], "action": "SCMP_ACT_ALLOW",
                        "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]}),
    ("SCMP_ACT_ERRNO", {"names": ["epoll_create"], "action": "SCMP_ACT_KILL",
                        "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}]}),
])
@pytest.mark.parametrize("allowed_too", [False, True])
def test_a_base_that_refuses_an_epoll_create_keeps_its_rule(default, rule, allowed_too):
    """Trapped, an epoll_create would be continued by the agent whatever the
    base said: where the base refuses some or all of its calls, its rule
    stays as it was (an unconditional allow beside it too) and only the
    other one (let through) is trapped."""
    also = [{"names": ["epoll_create"], "action": "SCMP_ACT_ALLOW"}] if allowed_too else []
    base = {"defaultAction": default, "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [rule, {"names": ["epoll_create1"], "action": "SCMP_ACT_ALLOW"},
                         {"names": ["bind", "listen", "connect"], "action": "SCMP_ACT_ALLOW"}]
            + also}
    prof = moci.build_profile(base, "/run/sg/oci.sock")
    names = _by_name(prof)
    if rule["action"] == "SCMP_ACT_ALLOW" and allowed_too:     # every call let through
        assert [r["action"] for r in names["epoll_create"]] == ["SCMP_ACT_NOTIFY"]
    else:
        assert names["epoll_create"] == [rule] + also
    assert [r["action"] for r in names["epoll_create1"]] == ["SCMP_ACT_NOTIFY"]
    assert moci.build_profile(prof, "/run/sg/oci.sock") == prof


def _actions(prof):
    return {n: sorted(r["action"] for r in rs) for n, rs in _by_name(prof).items()}


def test_a_merge_keeps_the_bases_rules_for_what_it_does_not_trap():
    """Only what a mode traps (bind, listen, connect or socket, epoll_create)
    and io_uring (denied) give way to sockgraft's rules: socket() in syscall
    mode, connect() in socket mode and sendto() keep the base's (a merge
    into a refusing default once dropped socket's allow: every socket()
    failed). A previous merge's trap of what the new mode does not trap goes,
    and the call is allowed as the base had it."""
    sys_ = _actions(moci.build_profile(DOCKERISH, "/x"))
    assert sys_["socket"] == sys_["sendto"] == ["SCMP_ACT_ALLOW"]
    assert sys_["connect"] == ["SCMP_ACT_NOTIFY"]
    sock = _actions(moci.build_profile(DOCKERISH, "/x", "socket"))
    assert sock["connect"] == sock["sendto"] == ["SCMP_ACT_ALLOW"]
    assert sock["socket"] == ["SCMP_ACT_NOTIFY"]
    for a, b in (("syscall", "socket"), ("socket", "syscall")):
        switched = moci.build_profile(moci.build_profile(DOCKERISH, "/x", a), "/x", b)
        assert _actions(switched) == _actions(moci.build_profile(DOCKERISH, "/x", b)), (a, b)
    refusing = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["sendto"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    assert _actions(moci.build_profile(refusing, "/x"))["sendto"] == ["SCMP_ACT_ERRNO"]


MOBY_SOCKET = {"names": ["socket"], "action": "SCMP_ACT_ALLOW",
               "args": [{"index": 0, "value": 40, "op": "SCMP_CMP_NE"}]}   # not AF_VSOCK


@pytest.mark.parametrize("base, mode, name", [
    # Docker's default allows socket() but for AF_VSOCK: socket mode would let it through
    ({**DOCKERISH, "syscalls": [{"names": ["bind", "connect", "listen"],
                                 "action": "SCMP_ACT_ALLOW"}, MOBY_SOCKET]}, "socket", "socket"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["bind"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}, "syscall", "bind"),
    ({**DOCKERISH, "syscalls": [{"names": ["bind", "connect", "socket"],
                                 "action": "SCMP_ACT_ALLOW"}]}, "syscall", "listen"),
])
def test_a_base_that_refuses_what_the_mode_traps_is_refused(base, mode, name, tmp_path):
    """A trapped call the agent does not graft is let through: merged into a
    base that refuses some (or all) calls of a syscall the mode traps, the
    refusal would be lost - refused with an error that names the syscall and
    the base's rules; the same base merges in the other mode where that
    syscall is not trapped."""
    with pytest.raises(ConfigError) as err:
        moci.build_profile(base, "/x", mode)
    assert f"{name}()" in str(err.value) and "undo that refusal" in str(err.value)
    if name == "socket":
        assert "--graft-at syscall" in str(err.value)
        merged = _by_name(moci.build_profile(base, "/x", "syscall"))
        assert merged["socket"] == [MOBY_SOCKET]            # kept as the base has it
    f = tmp_path / "base.json"
    f.write_text(json.dumps(base))
    p = _cli("oci-profile", "--base", str(f), "--graft-at", mode)
    assert p.returncode == 2 and f"{name}()" in p.stderr, p.stderr


def test_a_merged_profile_lists_the_native_abis_only():
    """The kernel never runs the cgroup setsockopt guard for compat calls:
    Docker's default (x86_64, x86, x32) merges to x86_64 alone, archMap
    goes; a base of compat ABIs only is refused."""
    docker = {**DOCKERISH, "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86",
                                             "SCMP_ARCH_X32"],
              "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                           "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]}]}
    for mode in ("syscall", "socket"):
        prof = moci.build_profile(docker if mode == "syscall" else
                                  {**docker, "defaultAction": "SCMP_ACT_ALLOW"}, "/x", mode)
        assert prof["architectures"] == ["SCMP_ARCH_X86_64"] and "archMap" not in prof
    aarch = moci.build_profile({**DOCKERISH, "architectures": ["SCMP_ARCH_AARCH64",
                                                               "SCMP_ARCH_ARM"]}, "/x")
    assert aarch["architectures"] == ["SCMP_ARCH_AARCH64"]
    with pytest.raises(ConfigError, match="64-bit architecture"):
        moci.build_profile({**DOCKERISH, "architectures": ["SCMP_ARCH_X86"]}, "/x")


def test_the_network_names_the_container_not_its_annotation():
    h = moci.parse_handoff(json.dumps(STATE).encode(), 1)      # annotates default.web
    assert moci.container_name(h, "pods.web") == "pods.web"
    assert "ignored" in moci.name_refused(h, "pods.web")
    assert moci.name_refused(h, "default.web") == ""
    assert moci.container_name(h, None) == "default.web"        # no network registration
    # annotations not trusted: never the annotation, whatever else there is
    assert moci.container_name(h, None, trusted=False) == "web"
    assert "ignored" in moci.name_refused(h, "web")


def test_an_application_container_finds_its_pods_sandbox():
    for key in moci.SANDBOX_ID_ANNOTATIONS:
        st = {**STATE, "state": {**STATE["state"], "annotations": {key: "sandbox1"}}}
        assert moci.sandbox_id(moci.parse_handoff(json.dumps(st).encode(), 1)) == "sandbox1"
    assert moci.sandbox_id(moci.parse_handoff(json.dumps(STATE).encode(), 1)) is None


def test_a_sandbox_that_names_itself_reads_no_further_key():
    """A containerd sandbox's spec names itself under the containerd key; a
    second key (which a pod's own annotations could carry) is never read."""
    own = moci.parse_handoff(json.dumps(STATE).encode(), 1).container_id
    ann = {moci.SANDBOX_ID_ANNOTATIONS[0]: own, moci.SANDBOX_ID_ANNOTATIONS[1]: "victim"}
    st = {**STATE, "state": {**STATE["state"], "annotations": ann}}
    assert moci.sandbox_id(moci.parse_handoff(json.dumps(st).encode(), 1)) is None


@pytest.mark.parametrize("first_is_the_pods", [True, False])
def test_disagreeing_runtime_sandbox_keys_name_no_sandbox(first_is_the_pods):
    """Under CRI-O a pod's annotations reach its containers' specs: a pod
    writes containerd's key naming a victim's sandbox (or, under containerd
    with pod annotations passed through, CRI-O's). Neither key is followed
    when they disagree; when they agree, or only one is there, it is."""
    own_sandbox, victim = "sandbox-of-this-pod", "sandbox-of-the-victim"
    keys = moci.SANDBOX_ID_ANNOTATIONS
    ann = {keys[0]: victim, keys[1]: own_sandbox} if first_is_the_pods else \
        {keys[0]: own_sandbox, keys[1]: victim}
    st = {**STATE, "state": {**STATE["state"], "annotations": ann}}
    h = moci.parse_handoff(json.dumps(st).encode(), 1)
    assert moci.sandbox_id(h) is None and "disagree" in moci.sandbox_conflict(h)
    for agree in ({keys[0]: own_sandbox, keys[1]: own_sandbox}, {keys[1]: own_sandbox},
                  {keys[0]: own_sandbox}):
        st = {**STATE, "state": {**STATE["state"], "annotations": agree}}
        h = moci.parse_handoff(json.dumps(st).encode(), 1)
        assert moci.sandbox_id(h) == own_sandbox and moci.sandbox_conflict(h) == ""


def test_untrusted_annotations_give_no_configuration():
    ann = {"sockgraft/endpoints": "ep=ipv4:10.0.0.1:80", "sockgraft/ingress": "0.0.0.0:80=ep"}
    assert moci.config_from_annotations("c", ann) is not None
    with pytest.raises(ConfigError, match="--annotations ignore"):
        moci.config_from_annotations("c", ann, trusted=False)
    assert moci.config_from_annotations("c", {"sockgraft/container": "c"},
                                        trusted=False) is None


def _ioctl_rules(prof):
    return [r for r in prof["syscalls"] if "ioctl" in r["names"]]


TIOCSTI_REFUSED = {"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                   "args": [{"index": 1, "value": 0x5412, "op": "SCMP_CMP_EQ"}]}


def _matches(rule, cmd):
    return all((cmd & a["value"]) == a["valueTwo"] if a["op"] == "SCMP_CMP_MASKED_EQ"
               else cmd == a["value"] for a in rule.get("args") or [])


@pytest.mark.parametrize("base", [
    None,                                                       # allow-all
    {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [           # Docker's shape
        {"names": ["bind", "listen", "connect", "socket", "ioctl", "read"],
         "action": "SCMP_ACT_ALLOW"}, TIOCSTI_REFUSED]},
])
def test_socket_ioctls_are_trapped_beside_the_bases_ioctl_rules(base):
    """Every ioctl command matches exactly one of: the trap (socket ioctl
    types), the rules that stand for the base's plain "ioctl allowed"
    (libseccomp would let a plain rule win over the trap), the base's own
    conditional rules (TIOCSTI refused, which also keeps precedence)."""
    prof = moci.build_profile(base, "/run/sg/oci.sock")
    rules = _ioctl_rules(prof)
    ours = [r for r in rules if r["action"] == "SCMP_ACT_NOTIFY"]
    assert sorted(r["args"][0]["valueTwo"] for r in ours) == [0x8900, 0x8B00]
    assert all(r["args"] for r in rules)            # no plain rule left to win
    for cmd in [0x5412, 0x5401, 0x541B, 0x8912, 0x8933, 0x8B01, 0xC0208933, 0x8906, 0x4004AE01,
                0x8800, 0x8A00, 0x8C00, 0x0, 0xFFFF, 0xFFFFFFFF] + list(range(0, 0x10000, 0x100)):
        hit = [r["action"] for r in rules if _matches(r, cmd)]
        trapped = (cmd & 0xFF00) in (0x8900, 0x8B00)
        if base is None:
            assert hit == (["SCMP_ACT_NOTIFY"] if trapped else []), hex(cmd)
        else:
            want = ["SCMP_ACT_NOTIFY" if trapped else "SCMP_ACT_ALLOW"]
            assert [a for a in hit if a != "SCMP_ACT_ERRNO"] == want, (hex(cmd), hit)
            assert ("SCMP_ACT_ERRNO" in hit) == (cmd == 0x5412), hex(cmd)
    assert moci.build_profile(prof, "/run/sg/oci.sock") == prof      # idempotent
    assert moci.check_profile(prof) == []


def test_a_base_that_allows_some_ioctls_only_is_not_widened():
    base = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["bind", "listen", "connect"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 1, "value": 0x5401, "op": "SCMP_CMP_EQ"}]}]}
    prof = moci.build_profile(base, "/run/sg/oci.sock")
    assert all(r["action"] != "SCMP_ACT_NOTIFY" for r in _ioctl_rules(prof))


@pytest.mark.parametrize("cond", [
    {"index": 1, "value": 0x8912, "op": "SCMP_CMP_EQ"},            # SIOCGIFCONF itself
    {"index": 1, "value": 0x8000, "op": "SCMP_CMP_GE"},             # a range with them
    {"index": 0, "value": 3, "op": "SCMP_CMP_EQ"},                  # one fd, any command
    {"index": 1, "value": 0xF000, "valueTwo": 0x8000, "op": "SCMP_CMP_MASKED_EQ"},
])
def test_a_base_that_allows_socket_ioctls_conditionally_is_refused(cond):
    base = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["bind", "listen", "connect"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW", "args": [cond]}]}
    with pytest.raises(ConfigError, match=r"allows some ioctl\(\) commands only \(syscalls\[1\]\)"):
        moci.build_profile(base, "/run/sg/oci.sock")


def test_a_base_pinning_other_command_types_by_mask_merges():
    base = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["bind", "listen", "connect"], "action": "SCMP_ACT_ALLOW"},
        {"names": ["ioctl"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 1, "value": 0xFF00, "valueTwo": 0x5400, "op": "SCMP_CMP_MASKED_EQ"}]}]}
    prof = moci.build_profile(base, "/run/sg/oci.sock")       # terminal ioctls only: fine
    assert all(r["action"] != "SCMP_ACT_NOTIFY" for r in _ioctl_rules(prof))


def test_a_base_that_traces_ioctl_is_refused():
    base = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["ioctl"], "action": "SCMP_ACT_TRACE"}]}
    with pytest.raises(ConfigError, match="ioctl"):
        moci.build_profile(base, "/run/sg/oci.sock")
