"""`sockgraft bench --quick` end to end: every path, real tools, all outputs."""

import json
import os
import re
import subprocess
import sys

import pytest

from sockgraft.bench.harness import PATHS

# two of the quick workloads keep the suite short: a stream and a connection
# rate cover both kinds of figure; every workload's parser has unit tests
RUN = ("iperf3", "crr")
from sockgraft.kernel import netns

pytestmark = pytest.mark.e2e


def test_bench_quick_produces_everything_for_every_path(state_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, SOCKGRAFT_STATE_DIR=str(state_dir))
    sg = [sys.executable, "-m", "sockgraft.cli.main", "bench"]
    proc = subprocess.run(sg + ["--quick", "--workloads", *RUN, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["failures"] == []
    have = {(s["workload"], s["path"]) for s in res["summary"]}
    assert have == {(w, p) for w in RUN for p in PATHS}
    from sockgraft.bench.workloads import WORKLOADS
    for s in res["summary"]:
        assert set(s) >= {"workload", "path", "metric", "min", "median", "max", "rounds"}
        if s["metric"] in WORKLOADS[s["workload"]].metrics + ("cpu_us_per_op",):
            assert s["median"] > 0, s          # counters such as "failed" may be 0
    pairs = {(r["path"], r["reference"]) for r in res["ratios"]}
    assert pairs == {("graft-local", "host-loopback"), ("graft-local", "bridge"),
                     ("graft-remote", "host-underlay"), ("graft-remote", "vxlan"),
                     ("graft-remote", "nat"), ("graft-splice", "host-loopback"),
                     ("graft-splice", "graft-local"), ("fast-local", "bridge"),
                     ("fast-remote", "vxlan"), ("trap-floor", "host-loopback"),
                     ("graft-local", "trap-floor"), ("fast-local", "host-loopback"),
                     ("fast-remote", "host-underlay"), ("host-loopback", "bridge"),
                     ("host-underlay", "vxlan")}
    # the floor path really trapped: a socket() per connection, each answered
    floor = (out / "raw" / "r1-crr-trap-floor.txt").read_text()
    conns = json.loads(re.search(r'\{"conns".*\}', floor).group(0))["conns"]
    traps = json.loads(re.search(r'\{"traps".*\}', floor).group(0))
    assert conns > 0 and traps["traps"] >= conns and traps["status"] == 0, floor[-500:]
    assert len(list((out / "raw").iterdir())) == len(RUN) * len(PATHS)
    assert "Requests" not in (out / "raw" / "r1-iperf3-nat.txt").read_text()
    assert '"sum_received"' in (out / "raw" / "r1-iperf3-graft-remote.txt").read_text()
    for w in RUN:
        assert (out / "plots" / f"{w}.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "| graft-remote |" in md and "Only ratios within one run are stable" in md
    # re-render from the stored files alone
    (out / "report.md").unlink()
    rep = subprocess.run(sg + ["report", str(out)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert (out / "report.md").read_text() == md
    assert not [n for n in netns.list_names() if n.startswith("sg-k")]
