"""deploy/: every file parsed and checked against what its consumer requires
(Kubernetes object fields, the CNI conflist, the seccomp profile the agent
expects, the annotations the agent accepts, the guide's flags)."""

import json
import os

import pytest
import yaml

from sockgraft.model import oci as moci
from sockgraft.model.graftconfig import load_config

pytestmark = pytest.mark.unit

DEPLOY = os.path.join(os.path.dirname(__file__), "..", "..", "deploy")
LISTENER = "/run/sockgraft/oci-default.sock"


def _load(*parts):
    path = os.path.join(DEPLOY, *parts)
    with open(path) as f:
        return yaml.safe_load(f) if path.endswith(".yaml") else json.load(f)


K8S_VERSION = "1.31"     # the Kubernetes schemas the manifests are validated against


def _manifests():
    d = os.path.join(DEPLOY, "kubernetes")
    for name in sorted(os.listdir(d)):
        if name.endswith(".yaml"):
            with open(os.path.join(d, name)) as f:
                for i, doc in enumerate(yaml.safe_load_all(f)):
                    if doc is not None:
                        yield f"{name}#{i}", doc


@pytest.mark.parametrize("where, doc", list(_manifests()), ids=lambda x: x
                         if isinstance(x, str) else "")
def test_manifests_validate_against_the_kubernetes_schemas(where, doc):
    """Every object under deploy/kubernetes, strictly (no unknown fields),
    against the schemas of Kubernetes K8S_VERSION (kubernetes-validate)."""
    import kubernetes_validate
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_broken_manifest():
    import copy

    import kubernetes_validate
    ds = copy.deepcopy(_load("kubernetes", "daemonset.yaml"))
    ds["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "9464"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)
    ds = copy.deepcopy(_load("kubernetes", "daemonset.yaml"))
    ds["spec"]["template"]["spec"]["hostNetwrk"] = True          # a typo: strict refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSION, strict=True)


def test_daemonset_is_a_valid_privileged_host_agent():
    """What the schemas cannot say: how the agent must run."""
    ds = _load("kubernetes", "daemonset.yaml")
    assert (ds["apiVersion"], ds["kind"]) == ("apps/v1", "DaemonSet")
    spec = ds["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    (agent,) = [c for c in pod["containers"] if c["name"] == "agent"]
    assert agent["securityContext"]["privileged"] is True
    assert "sockgraft agent" in " ".join(agent["command"])
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/run/sockgraft", "/sys/fs/bpf", "/sys/fs/cgroup"} <= mounts
    vols = {v["name"] for v in pod["volumes"]}
    for c in pod["containers"] + pod["initContainers"]:
        for m in c.get("volumeMounts", []):
            assert m["name"] in vols, f"{c['name']} mounts unknown volume {m['name']}"
    init = " ".join(pod["initContainers"][0]["args"])
    assert "sockgraft-cni" in init and "10-sockgraft.conflist" in init and "sockgraft.json" in init
    cm_ref = agent["envFrom"][0]["configMapRef"]["name"]
    cm = _load("kubernetes", "configmap.yaml")
    assert (cm["kind"], cm["metadata"]["name"]) == ("ConfigMap", cm_ref)
    assert cm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    # the metrics port the agent serves is the one exposed and announced
    from sockgraft.agent.metrics import parse_listen
    from sockgraft.cli.main import build_parser
    args = build_parser().parse_args(["agent", *cm["data"]["AGENT_ARGS"].split()])
    port = parse_listen(args.metrics)[1]
    assert {"name": "metrics", "containerPort": port, "hostPort": port,
            "protocol": "TCP"} in agent["ports"]
    ann = spec["template"]["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == str(port)


def test_daemonset_runs_the_image_the_recipe_builds():
    """deploy/image/build.sh tags localhost/sockgraft/agent:VERSION with the
    package version and lays out what the DaemonSet's containers use."""
    import re
    import tomllib

    import sockgraft
    with open(os.path.join(DEPLOY, "..", "pyproject.toml"), "rb") as f:
        version = tomllib.load(f)["project"]["version"]
    assert sockgraft.__version__ == version
    with open(os.path.join(DEPLOY, "image", "build.sh")) as f:
        recipe = f.read()
    assert re.search(r"^REF=localhost/sockgraft/agent:\$VERSION$", recipe, re.M)
    pod = _load("kubernetes", "daemonset.yaml")["spec"]["template"]["spec"]
    for c in pod["containers"] + pod["initContainers"]:
        assert c["image"] == f"localhost/sockgraft/agent:{version}", c["name"]
        assert c["imagePullPolicy"] == "Never"     # built and loaded on the node
    init = " ".join(pod["initContainers"][0]["args"])
    # every path the init container copies from is one the recipe fills
    for src in re.findall(r"cp (/opt/sockgraft/\S+)", init):
        rel = src.removeprefix("/opt/sockgraft/")
        assert (rel == "host/sockgraft-cni" and "/opt/sockgraft/host/" in recipe) or \
            (rel.startswith("deploy/") and os.path.exists(os.path.join(DEPLOY, rel[7:]))), src


def test_configmap_agent_args_and_container_config_parse():
    cm = _load("kubernetes", "configmap.yaml")
    from sockgraft.cli.main import build_parser
    args = build_parser().parse_args(["agent", *cm["data"]["AGENT_ARGS"].split()])
    assert args.oci_socket == LISTENER and args.directory.startswith("etcd://")
    cfg = load_config(cm["data"]["containers.toml"], "configmap containers.toml")
    assert cfg.ingress


def test_conflist_chains_sockgraft_after_the_interface_plugin():
    cl = _load("cni", "10-sockgraft.conflist")
    assert cl["cniVersion"] in ("0.4.0", "1.0.0") and cl["name"]
    types = [p["type"] for p in cl["plugins"]]
    assert types[0] == "bridge" and types[-1] == "sockgraft-cni"
    assert cl["plugins"][0]["ipam"]["type"] == "host-local"
    assert cl["plugins"][-1]["agentSocket"].startswith(cl["plugins"][-1]["stateDir"])


@pytest.mark.parametrize("name, graft_at", [("sockgraft.json", "syscall"),
                                            ("sockgraft-socket.json", "socket")])
def test_profiles_are_what_oci_profile_writes(name, graft_at):
    prof = _load("seccomp", name)
    assert moci.check_profile(prof) == []
    assert prof == moci.build_profile(None, LISTENER, graft_at), \
        f"regenerate: sockgraft oci-profile --listener {LISTENER} --graft-at {graft_at}"
    assert prof["listenerPath"] == LISTENER


def test_pod_example_annotations_are_accepted():
    pod = _load("kubernetes", "pod-example.yaml")
    ann = pod["metadata"]["annotations"]
    cfg = moci.config_from_annotations(ann["sockgraft/container"], ann)
    assert cfg is not None and cfg.ingress and cfg.egress and cfg.policy.deny
    sp = pod["spec"]["securityContext"]["seccompProfile"]
    assert sp == {"type": "Localhost", "localhostProfile": "profiles/sockgraft.json"}


def test_guide_names_the_flags_for_each_runtime():
    with open(os.path.join(DEPLOY, "runtimes.md")) as f:
        text = f.read()
    for needle in ("docker run --security-opt seccomp=", "podman run --security-opt seccomp=",
                   "pod_annotations", "Localhost", "sockgraft oci-profile", "sockgraft-cni",
                   "listenerPath"):
        assert needle in text, needle
