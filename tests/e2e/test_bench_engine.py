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
                           "--sockets", "2000", "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((out / "engine-results.json").read_text())
    for key in ("throughput graft/host", "rtt avg graft/host",
                "connect rate graft/plain container", "accept rate graft server/host server"):
        assert res["ratios"][key] > 0.05
    assert res["scale"]["sockets_grafted"] == 12 and res["scale"]["grafted_counter"] >= 12
    assert res["scale"]["agent_after"]["fds"] <= res["scale"]["agent_before"]["fds"]
    assert "| client conn/s |" in proc.stdout and (out / "engine-report.md").exists()
    # socket() of a socket-mode container, both answer paths, as the application sees it
    med = res["median"]
    for key in ("native", "python", "plain"):
        assert 0 < med[f"socklat_p50_{key}"] <= med[f"socklat_p99_{key}"], key
    for key in ("native", "python"):
        assert med[f"agent_cpu_{key}"] > 0 and med[f"conn_socket_{key}"] > 0, key
    assert med["socklat_p50_plain"] < med["socklat_p50_native"]     # trapped costs more
    assert "| native loop (C) |" in proc.stdout and "| Python threads |" in proc.stdout
    # connect() of a syscall-mode container, both paths
    for key in ("native", "python"):
        for nb in ("", "_nb"):
            assert med[f"conn_graft{nb}_{key}"] > 0, key + nb
            assert med[f"agent_cpu_connect{nb}_{key}"] > 0, key + nb
        assert res["ratios"][f"connect rate syscall-graft {key}/plain container"] > 0.05
        assert res["ratios"][f"connect rate syscall-graft non-blocking {key}/plain container"] \
            > 0.05
    assert "| Python grafter | blocking |" in proc.stdout
    assert "| native loop (C) | non-blocking |" in proc.stdout
    assert not [n for n in netns.list_names() if n.startswith("sg-b")]
