"""Benchmark results: summary statistics, ratios, the markdown report and the
plots, computed from the stored per-run records alone (so `sockgraft bench
report DIR` can re-render everything without running anything).

Pure except for `write_outputs`, which writes results.json, report.md and the
PNG plots. Ratios are medians of per-round ratios (round r of a path against
round r of its reference), the way to get stable figures on a noisy machine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics

# graft and fast paths against their limit and against the path they replace
REFERENCES = (("graft-local", "host-loopback"), ("graft-remote", "host-underlay"),
              ("graft-local", "bridge"), ("graft-remote", "vxlan"), ("graft-remote", "nat"),
              ("graft-splice", "host-loopback"), ("graft-splice", "graft-local"),
              ("fast-local", "bridge"), ("fast-remote", "vxlan"),
              # the fast paths against the host's own path (their limit), and
              # that limit against the container path: the most they can gain
              ("fast-local", "host-loopback"), ("fast-remote", "host-underlay"),
              ("host-loopback", "bridge"), ("host-underlay", "vxlan"),
              # the floor of any per-connection trap, and how far above it grafting is
              ("trap-floor", "host-loopback"), ("graft-local", "trap-floor"))
log = logging.getLogger(__name__)

LOWER_IS_BETTER = {"rtt_avg_us", "rtt_p99_us", "cpu_us_per_op"}


def summarize(runs: list[dict]) -> list[dict]:
    """[{workload, path, metric, min, median, max, rounds}] from per-run records
    ({round, workload, path, metrics: {name: value}})."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in runs:
        for metric, value in r["metrics"].items():
            groups.setdefault((r["workload"], r["path"], metric), []).append(value)
    return [{"workload": w, "path": p, "metric": m, "min": min(v),
             "median": statistics.median(v), "max": max(v), "rounds": len(v)}
            for (w, p, m), v in groups.items()]


def ratios(runs: list[dict]) -> list[dict]:
    by: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in runs:
        for metric, value in r["metrics"].items():
            by.setdefault((r["workload"], r["path"], metric), {})[r["round"]] = value
    out = []
    for (w, p, m), rounds in sorted(by.items()):
        for path, ref in REFERENCES:
            if p != path or (w, ref, m) not in by:
                continue
            base = by[(w, ref, m)]
            per_round = [rounds[k] / base[k] for k in rounds if k in base and base[k]]
            if per_round:
                out.append({"workload": w, "metric": m, "path": path, "reference": ref,
                            "median_ratio": statistics.median(per_round),
                            "rounds": len(per_round)})
    return out


def machine() -> dict:
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1048576:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "cpu": cpu, "memory": mem,
            "python": platform.python_version()}


def render(results: dict) -> str:
    m = results.get("machine", {})
    lines = ["# sockgraft benchmark report", "",
             f"Machine: {m.get('cpus')} vCPU {m.get('cpu', '')}, {m.get('memory', '')}, "
             f"Linux {m.get('kernel', '')}. {results.get('rounds')} round(s) of "
             f"{results.get('seconds')} s per measure, paths interleaved round by round. "
             + ("Client and server of every run on one vCPU "
                f"(`--pin {results['pin']}`): no cross-vCPU wake-ups in the figures."
                if results.get("pin") is not None else
                "Client and server of every request/response run on one vCPU "
                f"(`--pin-rr {results['pin_rr']}`), bulk transfers (iperf3) on every vCPU."
                if results.get("pin_rr") is not None else
                "Client and server wherever the scheduler puts them."), "",
             "Only ratios within one run are stable: client, server, agent and every network "
             "stack share the same cores, and absolute figures wander between runs. Ratios "
             "are medians of per-round ratios.", ""]
    summary = results["summary"]
    workloads = list(dict.fromkeys(s["workload"] for s in summary))
    paths = list(dict.fromkeys(s["path"] for s in summary))
    for w in workloads:
        metrics = list(dict.fromkeys(s["metric"] for s in summary if s["workload"] == w))
        lines += [f"## {w}", "", "| path | " + " | ".join(metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for p in paths:
            cells = []
            for metric in metrics:
                s = next((s for s in summary if (s["workload"], s["path"], s["metric"]) ==
                          (w, p, metric)), None)
                cells.append("" if s is None else
                             f"{_fmt(s['median'])} ({_fmt(s['min'])}-{_fmt(s['max'])})")
            if any(cells):
                lines.append(f"| {p} | " + " | ".join(cells) + " |")
        rs = [r for r in results["ratios"] if r["workload"] == w]
        if rs:
            lines += ["", "| metric | path | vs | median ratio |", "|---|---|---|---|"]
            for r in rs:
                better = "lower is better" if r["metric"] in LOWER_IS_BETTER else ""
                lines.append(f"| {r['metric']} | {r['path']} | {r['reference']} | "
                             f"{r['median_ratio']:.2f}x {better} |")
        lines.append("")
    failed = results.get("failures", [])
    if failed:
        lines += ["## Failed runs", ""] + [f"- round {f['round']} {f['workload']} "
                                           f"{f['path']}: {f['error']}" for f in failed] + [""]
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}"


def plot(results: dict, out_dir: str) -> list[str]:
    """One PNG per workload: median of each metric per path, min-max whiskers.
    Without matplotlib (the agent's image has none) the plots are skipped, said once."""
    try:
        import matplotlib
    except ImportError:
        log.warning("plots skipped: matplotlib is not installed (pip install 'sockgraft[bench]')")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    written = []
    summary = results["summary"]
    for w in dict.fromkeys(s["workload"] for s in summary):
        metrics = [m for m in dict.fromkeys(s["metric"] for s in summary if s["workload"] == w)]
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6),
                                 squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            rows = [s for s in summary if s["workload"] == w and s["metric"] == metric]
            names = [s["path"] for s in rows]
            med = [s["median"] for s in rows]
            err = [[s["median"] - s["min"] for s in rows], [s["max"] - s["median"] for s in rows]]
            colors = ["tab:green" if n.startswith("graft") else "tab:gray" for n in names]
            ax.bar(names, med, yerr=err, color=colors, capsize=3)
            ax.set_title(f"{w}: {metric}")
            ax.tick_params(axis="x", rotation=45)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{w}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def build(runs: list[dict], meta: dict) -> dict:
    return {**meta, "machine": meta.get("machine") or machine(), "runs": runs,
            "summary": summarize(runs), "ratios": ratios(runs)}


def write_outputs(results: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render(results))
    plot(results, os.path.join(out_dir, "plots"))


def rerender(out_dir: str) -> dict:
    """`sockgraft bench report DIR`: everything again from results.json's runs."""
    with open(os.path.join(out_dir, "results.json")) as f:
        stored = json.load(f)
    results = build(stored["runs"], {k: v for k, v in stored.items()
                                     if k not in ("runs", "summary", "ratios")})
    write_outputs(results, out_dir)
    return results
