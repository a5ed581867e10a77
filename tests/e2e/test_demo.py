"""The README's main job end to end: lab up, status, iperf3 on every path, down."""

import os
import re
import subprocess
import sys

import pytest

from sockgraft.kernel import netns

pytestmark = pytest.mark.e2e


def test_demo_measures_every_baseline_path_and_cleans_up(state_dir, lab_name):
    env = dict(os.environ, SOCKGRAFT_STATE_DIR=str(state_dir))
    proc = subprocess.run([sys.executable, "-m", "sockgraft.cli.main", "demo", "--name", lab_name,
                           "--seconds", "1"], capture_output=True, text=True, env=env,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for path in ("host-loopback", "host-underlay", "bridge", "nat", "vxlan"):
        m = re.search(rf"^  {path}\s+([\d.]+) Gbit/s", out, re.M)
        assert m, f"no figure for {path} in:\n{out}"
        assert float(m.group(1)) > 0.05
    assert "ratio to host-loopback" in out
    row = r"^  (.*{}.*?)\s+([\d.]+) Gbit/s\s+([\d.]+) MB on .*?([\d.]+) MB VXLAN"
    grafted = re.findall(row.format("grafted"), out, re.M)
    plain = re.findall(row.format("plain"), out, re.M)
    fast = re.findall(row.format("fast path"), out, re.M)
    assert len(grafted) == 3 and len(plain) == 5 and len(fast) == 2, out
    for _, gbit, mb, _vx in grafted:
        assert float(gbit) > 0.05 and float(mb) < 0.1     # nothing crossed the veth
    for _, gbit, mb, _vx in plain:
        assert float(mb) > 10                             # the plain path does cross it
    vx_plain = [float(v) for label, _, _, v in plain if "VXLAN" in label]
    (vx_graft,) = [float(v) for label, _, _, v in grafted if "directory" in label]
    assert len(vx_plain) == 2 and min(vx_plain) > 10 and vx_graft < 0.1   # bypass: no overlay
    for _, gbit, _mb, vx in fast:           # plain programs, no VXLAN device either way
        assert float(gbit) > 0.05 and float(vx) < 0.1
    assert f"lab {lab_name} is down" in out
    assert not [n for n in netns.list_names() if n.startswith(f"sg-{lab_name}-")]
