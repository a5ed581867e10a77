"""Smoke test of `sockgraft bench engine`: real tools, tiny durations."""

import json
import os
import subprocess
import sys

import pytest

from sockgraft.kernel import netns

pytestmark = pytest.mark.e2e


def test_bench_engine_prints_and_stores_its_figures(state_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, SOCKGRAFT_STATE_DIR=str(state_dir))
    proc = subprocess.run([sys.executable, "-m", "sockgraft.cli.main", "bench", "engine",
                           "--rounds", "1", "--seconds", "1", "--scale", "3", "4",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "engine-results.json").read_text())
    for key in ("throughput graft/host", "rtt avg graft/host",
                "connect rate graft/plain container", "accept rate graft server/host server"):
        assert res["ratios"][key] > 0.05
    assert res["scale"]["sockets_grafted"] == 12 and res["scale"]["grafted_counter"] >= 12
    assert res["scale"]["agent_after"]["fds"] <= res["scale"]["agent_before"]["fds"]
    assert "| client conn/s |" in proc.stdout and (out / "engine-report.md").exists()
    assert not [n for n in netns.list_names() if n.startswith("sg-b")]
