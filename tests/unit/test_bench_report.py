"""Benchmark summary, ratios, report and plots from stored runs; path planning."""

import json

import pytest

from sockgraft.bench import harness, report
from sockgraft.model.topology import parse_topology

pytestmark = pytest.mark.unit


def _runs():
    runs = []
    vals = {"host-loopback": [40, 30, 50], "graft-local": [38, 33, 45], "bridge": [20, 15, 25],
            "host-underlay": [24, 20, 30], "graft-remote": [23, 21, 27], "vxlan": [12, 10, 15],
            "nat": [16, 14, 20], "graft-splice": [52, 40, 60], "fast-local": [22, 18, 27],
            "fast-remote": [15, 12, 19], "trap-floor": [30, 25, 40]}
    for path, series in vals.items():
        for rnd, v in enumerate(series, start=1):
            runs.append({"round": rnd, "workload": "iperf3", "path": path,
                         "metrics": {"gbit_per_s": v, "cpu_us_per_op": 100 / v}})
    return runs


def test_summary_min_median_max_rounds():
    s = {(r["path"], r["metric"]): r for r in report.summarize(_runs())}
    row = s[("graft-local", "gbit_per_s")]
    assert (row["min"], row["median"], row["max"], row["rounds"]) == (33, 38, 45, 3)
    assert row["workload"] == "iperf3"


def test_ratios_are_medians_of_per_round_ratios():
    rs = {(r["path"], r["reference"], r["metric"]): r for r in report.ratios(_runs())}
    # per round 38/40, 33/30, 45/50 -> 0.95, 1.1, 0.9 -> median 0.95 (not 38/40 by chance:
    # the median of the ratios, not the ratio of the medians)
    assert rs[("graft-local", "host-loopback", "gbit_per_s")]["median_ratio"] == pytest.approx(0.95)
    assert rs[("graft-remote", "vxlan", "gbit_per_s")]["median_ratio"] == pytest.approx(
        sorted([23 / 12, 21 / 10, 27 / 15])[1])
    pairs = {(p, ref) for p, ref, _ in rs}
    assert pairs == set(report.REFERENCES)
    for r in rs.values():
        assert set(r) >= {"workload", "metric", "path", "reference", "median_ratio"}


def test_render_and_rerender_from_stored_runs(tmp_path):
    results = report.build(_runs(), {"rounds": 3, "seconds": 3, "failures": [
        {"round": 2, "workload": "iperf3", "path": "nat", "error": "boom"}]})
    report.write_outputs(results, str(tmp_path))
    md = (tmp_path / "report.md").read_text()
    assert "| graft-local | 38.00 (33.00-45.00) |" in md
    assert "| gbit_per_s | graft-remote | vxlan |" in md and "round 2 iperf3 nat: boom" in md
    png = (tmp_path / "plots" / "iperf3.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["summary"] and stored["ratios"] and stored["runs"]
    (tmp_path / "report.md").unlink()
    (tmp_path / "plots" / "iperf3.png").unlink()
    again = report.rerender(str(tmp_path))
    assert (tmp_path / "report.md").read_text() == md
    assert (tmp_path / "plots" / "iperf3.png").exists()
    assert again["ratios"] == stored["ratios"]


def test_without_matplotlib_the_report_is_written_and_plots_skipped(tmp_path, monkeypatch,
                                                                     caplog):
    """The agent's image carries no matplotlib (extra `bench`)."""
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import raises ImportError
    report.write_outputs(report.build(_runs(), {"rounds": 3, "seconds": 3}), str(tmp_path))
    assert (tmp_path / "report.md").exists() and (tmp_path / "results.json").exists()
    assert not (tmp_path / "plots").exists()
    assert "plots skipped: matplotlib is not installed" in caplog.text


def test_bench_paths_ports_and_graft_configs():
    plan = parse_topology(harness.topology_text("kx"), "<bench>")
    runs = harness.plan_runs(plan, "kx", 5201)
    assert set(runs) == set(harness.PATHS)
    assert runs["host-underlay"].target_port == 5202          # 5201 is published on h2
    assert runs["nat"].target == "198.18.0.2" and runs["nat"].target_port == 5201
    assert runs["graft-local"].listen == (plan.hosts[0].netns, 5203)
    assert runs["graft-remote"].client.graft == "h1-c1"
    assert runs["graft-remote"].server.graft == "h2-c2"
    assert runs["vxlan"].server.graft is None
    floor = harness.plan_runs(plan, "kx", 5201, "/bin/tf")["trap-floor"]
    assert floor.client.command(["crr", "client"]) == ["/bin/tf", "crr", "client"]
    assert floor.client.graft is None and floor.target == "127.0.0.1"
    assert floor.server == runs["host-loopback"].server
    cfgs = {c.container: c for c in harness.graft_configs(plan, {"iperf3": 5201, "redis": 6379})}
    from sockgraft.model.sockaddr import InetAddr
    rule, ep = cfgs["h2-c2"].match_ingress(InetAddr.of("::", 6379))
    assert (str(ep.addr), ep.port) == ("198.18.0.2", 6382)
    rule, ep = cfgs["h1-c1"].match_egress(InetAddr.of("198.18.0.2", 6382))
    assert str(ep.addr) == "198.18.0.1" and ep.port is None
    pubs = {str(p) for p in plan.node("h2-c1").publish}
    assert "11121:11121/udp" in pubs and "6379:6379/tcp" in pubs


def test_port_offsets_never_hit_another_published_port():
    used = {}
    for w, p in harness.PORTS.items():
        for off in range(4):
            assert (p + off) not in used, (w, p + off, used.get(p + off))
        for off in range(4):
            used[p + off] = w


def test_pinned_runs_say_so_in_the_report_and_wrap_argv():
    assert harness.pinned(["iperf3", "-s"], None) == ["iperf3", "-s"]
    assert harness.pinned(["iperf3", "-s"], 1) == ["taskset", "-c", "1", "iperf3", "-s"]
    spread = report.render(report.build(_runs(), {"rounds": 3, "seconds": 3, "pin": None}))
    pinned = report.render(report.build(_runs(), {"rounds": 3, "seconds": 3, "pin": 1}))
    assert "wherever the scheduler puts them" in spread and "--pin 1" not in spread
    assert "on one vCPU (`--pin 1`)" in pinned
    rr = report.render(report.build(_runs(), {"rounds": 3, "seconds": 3, "pin": None,
                                              "pin_rr": 1}))
    assert "(`--pin-rr 1`), bulk transfers (iperf3) on every vCPU" in rr


def test_only_bulk_transfers_stay_unpinned_under_pin_rr():
    from sockgraft.bench import workloads
    assert {n for n, w in workloads.WORKLOADS.items() if w.bulk} == {"iperf3"}


def test_pin_to_a_cpu_we_may_not_use_is_refused_before_anything_is_built(tmp_path):
    import os
    from sockgraft.errors import ConfigError
    bad = max(os.sched_getaffinity(0)) + 1
    with pytest.raises(ConfigError, match=f"--pin {bad}"):
        harness.run(("host-loopback",), ["iperf3"], out_dir=str(tmp_path / "out"), pin=bad)
    with pytest.raises(ConfigError, match=f"--pin-rr {bad}"):
        harness.run(("host-loopback",), ["iperf3"], out_dir=str(tmp_path / "out"), pin_rr=bad)
    assert not (tmp_path / "out").exists()


def test_agent_cpu_counts_threads_alive_at_both_samples_and_new_ones():
    """A notifier thread of an earlier session that ended between the two
    samples must not make the agent's CPU go down (seen in CI: -0.09 us); one
    that started in between ran only in between (seen in CI: 0.0 us when a
    session's threads were newer than the first sample); a reused id is
    never negative."""
    from sockgraft.bench.engine import _cpu_delta_ns
    before = {"1": 1000, "7": 5_000_000, "8": 200, "10": 9000}
    after = {"1": 1500, "8": 900, "9": 50, "10": 30}   # 7 ended, 9 started, 10 reused
    assert _cpu_delta_ns(before, after) == 500 + 700 + 50
