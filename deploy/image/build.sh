#!/usr/bin/env bash
# Build the sockgraft node agent's OCI image from Debian packages and the
# project's wheel, without any container registry:
#
#   mmdebstrap   a Debian root filesystem (python3, nftables, iproute2,
#                libbpf1) from the same apt sources as this machine
#   pip          the project's wheel and its pure-Python dependencies, built
#                here and installed offline into /opt/sockgraft (a venv)
#   clang        the cgroup BPF object, compiled here into the image's cache
#                (the image carries no compiler)
#   umoci        the OCI image layout, one layer, tagged with the version
#
# usage: deploy/image/build.sh [-o OUT_DIR] [-p PYTHON] [-s SUITE]
#   OUT_DIR  where the OCI layout (OUT_DIR/layout) and the OCI archive
#            (OUT_DIR/sockgraft-agent-VERSION.oci.tar) go; default build/image
#   PYTHON   an interpreter that can import sockgraft (default .venv/bin/python)
#   SUITE    the Debian release of the image (default: this machine's)
#
# Load the archive into a node's container runtime, e.g.
#   ctr -n k8s.io images import build/image/sockgraft-agent-0.1.0.oci.tar
#   podman load -i build/image/sockgraft-agent-0.1.0.oci.tar
# which names it localhost/sockgraft/agent:VERSION, the image the DaemonSet in
# deploy/kubernetes/ runs (imagePullPolicy: Never: no registry is involved).
set -euo pipefail
cd "$(dirname "$0")/../.."

OUT=build/image
PY=.venv/bin/python
SUITE=""
while getopts "o:p:s:h" opt; do
  case "$opt" in
    o) OUT=$OPTARG ;;
    p) PY=$OPTARG ;;
    s) SUITE=$OPTARG ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done

die() { echo "image: $*" >&2; exit 1; }
step() { echo "image: [$1/6] $2" >&2; }

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap and umoci unpack as root); try: sudo $0"
for tool in mmdebstrap umoci; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install $tool; ./run image installs it)"
done
[ -x "$PY" ] || command -v "$PY" >/dev/null || die "no interpreter $PY (./run install makes .venv)"
VERSION=$("$PY" -c 'import sockgraft; print(sockgraft.__version__)') \
  || die "$PY cannot import sockgraft"
REF=localhost/sockgraft/agent:$VERSION
if [ -z "$SUITE" ]; then
  SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  [ -n "$SUITE" ] || die "cannot tell this machine's Debian release; pass -s SUITE"
fi
# the same apt sources as this machine (a snapshot pin there makes the image reproducible)
SOURCES=()
for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list; do
  [ -s "$f" ] && SOURCES+=("$f")
done
[ ${#SOURCES[@]} -gt 0 ] || SOURCES=(http://deb.debian.org/debian)

WORK=$(mktemp -d /tmp/sockgraft-image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LAYOUT=$OUT/layout
ARCHIVE=$OUT/sockgraft-agent-$VERSION.oci.tar

step 1 "wheels of sockgraft $VERSION and its dependencies"
# the dependencies at the versions this project is tested with
"$PY" -m pip freeze --exclude-editable --disable-pip-version-check > "$WORK/constraints.txt"
"$PY" -m pip wheel -q --disable-pip-version-check -w "$WORK/wheels" -c "$WORK/constraints.txt" . \
  || die "pip wheel failed"

step 2 "CNI plugin for the node (a zipapp run by the node's python3 >= 3.11)"
mkdir -p "$WORK/cni/sockgraft" "$WORK/host"
(cd src && tar --exclude=__pycache__ -cf - sockgraft) | tar -C "$WORK/cni" -xf -
"$PY" -m zipapp "$WORK/cni" -m 'sockgraft.cni:main' -p '/usr/bin/env python3' \
  -o "$WORK/host/sockgraft-cni"

step 3 "BPF object (clang, cached by source hash like the agent does)"
SOCKGRAFT_CACHE_DIR=$WORK/cache "$PY" -c 'from sockgraft.kernel import bpf; print(bpf.compile_object())' \
  >/dev/null || die "cannot compile the BPF object (is clang installed?)"

step 4 "Debian $SUITE root filesystem (mmdebstrap)"
mmdebstrap --quiet --variant=essential \
  --include=python3,python3-venv,nftables,iproute2,libbpf1,mount,procps \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
  --customize-hook="cp -r '$WORK/wheels' \"\$1/tmp/wheels\"" \
  --customize-hook='chroot "$1" python3 -m venv /opt/sockgraft' \
  --customize-hook='chroot "$1" /opt/sockgraft/bin/pip install -q --no-index --disable-pip-version-check --find-links /tmp/wheels sockgraft' \
  --customize-hook='chroot "$1" /opt/sockgraft/bin/pip uninstall -q -y pip' \
  --customize-hook='rm -rf "$1/tmp/wheels"; find "$1/opt/sockgraft" -name __pycache__ -prune -exec rm -rf {} +' \
  --customize-hook='ln -s /opt/sockgraft/bin/sockgraft "$1/usr/local/bin/sockgraft"' \
  --customize-hook="mkdir -p \"\$1/opt/sockgraft/host\" \"\$1/opt/sockgraft/deploy\" \"\$1/var/cache/sockgraft\"" \
  --customize-hook="cp '$WORK/host/sockgraft-cni' \"\$1/opt/sockgraft/host/\"" \
  --customize-hook="cp -r deploy/cni deploy/seccomp \"\$1/opt/sockgraft/deploy/\"" \
  --customize-hook="cp -r '$WORK/cache/bpf' \"\$1/var/cache/sockgraft/\"" \
  --customize-hook='rm -rf "$1/var/lib/apt/lists"/* "$1/var/cache/apt"/* "$1/var/log"/*' \
  "$SUITE" "$WORK/rootfs" "${SOURCES[@]}" || die "mmdebstrap failed"

step 5 "OCI image $REF (umoci)"
rm -rf "$LAYOUT"
umoci init --layout "$LAYOUT"
umoci new --image "$LAYOUT:$VERSION"
umoci unpack --image "$LAYOUT:$VERSION" "$WORK/bundle" >/dev/null
rmdir "$WORK/bundle/rootfs" && mv "$WORK/rootfs" "$WORK/bundle/rootfs"
umoci repack --image "$LAYOUT:$VERSION" "$WORK/bundle"
umoci config --image "$LAYOUT:$VERSION" --os linux --architecture "$(dpkg --print-architecture)" \
  --author "sockgraft" --config.workingdir / \
  --config.env PATH=/opt/sockgraft/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.env PYTHONDONTWRITEBYTECODE=1 \
  --config.entrypoint sockgraft --config.cmd agent \
  --config.label "org.opencontainers.image.title=sockgraft-agent" \
  --config.label "org.opencontainers.image.version=$VERSION" \
  --config.label "org.opencontainers.image.source=deploy/image/build.sh" \
  --config.label "org.opencontainers.image.base.name=debian:$SUITE"
umoci gc --layout "$LAYOUT"
# containerd and podman name an imported image by this annotation
"$PY" - "$LAYOUT/index.json" "$REF" <<'EOF'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
with open(path) as f:
    index = json.load(f)
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = ref
with open(path, "w") as f:
    json.dump(index, f)
EOF

step 6 "OCI archive"
tar -C "$LAYOUT" -cf "$ARCHIVE" .
echo "image: built $REF" >&2
echo "  layout:  $LAYOUT (tag $VERSION)" >&2
echo "  archive: $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))" >&2
echo "  load it: ctr -n k8s.io images import $ARCHIVE" >&2
