"""Turns the files benches/run.sh writes into the markdown tables of BENCHMARKS.md.

Usage: summarize.py WORK_DIR SETTLE_MS
"""

import json
import statistics
import sys
from pathlib import Path

CASES = [
    ("floor", "floor: `tar czf \\| ssh tar xzf`"),
    ("cold", "push, cold (new venv, delta off)"),
    ("delta", "push, one file changed"),
    ("capistrano", "Capistrano 3 `cap deploy`, one file changed, code only"),
    ("full", "push, one file changed, delta off"),
    ("unchanged", "push, unchanged tree"),
    ("rollback", "rollback"),
]

STEP_CASES = ["delta", "unchanged", "rollback"]


def spread(values):
    """Formats the median with the min and max, in seconds."""
    if not values:
        return "-"
    median = statistics.median(values)
    return f"{median / 1000:.2f} ({min(values) / 1000:.2f}-{max(values) / 1000:.2f})"


def step_ms(summary, *names):
    return sum(step["duration_ms"] for step in summary["steps"] if step["name"] in names)


def has_health_gate(summary):
    return any(step["name"] == "health" for step in summary["steps"])


def load_runs(work):
    runs = {}
    for line in (work / "runs.tsv").read_text().splitlines():
        name, _, wall, rss, json_path = line.split("\t")
        run = {"wall": int(wall)}
        if json_path != "-":
            run["summary"] = json.loads((work / json_path).read_text())
            run["rss_kb"] = int(rss)
        runs.setdefault(name, []).append(run)
    return runs


def print_times(runs, settle_ms):
    print(f"Seconds: median (min-max). Health gate settle window: {settle_ms} ms.\n")
    print("| case | n | wall | wall less settle | upload+reuse | venv | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name, label in CASES:
        cases = runs.get(name, [])
        walls = [run["wall"] for run in cases]
        if name == "floor":
            print(f"| {label} | {len(cases)} | {spread(walls)} | - | {spread(walls)} | - | - |")
            continue
        if name == "capistrano":
            # Capistrano runs no health gate, so there is no settle window to subtract. Runs made
            # before the case existed have no row.
            if cases:
                print(f"| {label} | {len(cases)} | {spread(walls)} | {spread(walls)} | - | - | - |")
            continue
        less = [
            run["wall"] - (settle_ms if has_health_gate(run["summary"]) else 0) for run in cases
        ]
        upload = [step_ms(run["summary"], "upload", "reuse") for run in cases]
        venv = [step_ms(run["summary"], "venv") for run in cases]
        rss = max(run["rss_kb"] for run in cases) / 1024
        print(
            f"| {label} | {len(cases)} | {spread(walls)} | {spread(less)} | {spread(upload)} "
            f"| {spread(venv)} | {rss:.1f} |"
        )


def print_ratios(runs, settle_ms):
    floor = statistics.median(run["wall"] for run in runs["floor"])

    def median_of(name, value):
        return statistics.median(value(run) for run in runs[name])

    def less_settle(run):
        return run["wall"] - (settle_ms if has_health_gate(run["summary"]) else 0)

    def upload(run):
        return step_ms(run["summary"], "upload", "reuse")

    rows = [
        ("upload+unpack, cold push / floor", median_of("cold", upload), 1.0),
        ("upload+unpack, delta off / floor", median_of("full", upload), 1.0),
        ("one-file push less settle / floor", median_of("delta", less_settle), 0.15),
    ]
    print("\n| measure | value | target |")
    print("|---|---|---|")
    for label, value, target in rows:
        verdict = "met" if value / floor <= target else "missed"
        print(f"| {label} | {value / floor:.2f} | <= {target} ({verdict}) |")
    if "capistrano" in runs:
        capistrano = median_of("capistrano", lambda run: run["wall"])
        ratio = median_of("delta", less_settle) / capistrano
        verdict = "met" if ratio < 1.0 else "missed"
        label = "one-file push less settle / capistrano median"
        print(f"| {label} | {ratio:.2f} | < 1.0 ({verdict}) |")
    unchanged = median_of("unchanged", less_settle)
    verdict = "met" if unchanged < 500 else "missed"
    print(f"| unchanged push less settle, seconds | {unchanged / 1000:.2f} | < 0.5 ({verdict}) |")


def print_steps(runs):
    """Prints each step's median for the pushes whose time is mostly round trips."""
    print("\n| step, median ms | " + " | ".join(name for name in STEP_CASES) + " |")
    print("|---|" + "---|" * len(STEP_CASES))
    names = []
    for name in STEP_CASES:
        for run in runs.get(name, []):
            for step in run["summary"]["steps"]:
                if step["name"] not in names:
                    names.append(step["name"])
    for step_name in names:
        cells = []
        for name in STEP_CASES:
            # A step missing from a run (prune runs only when there is something to remove)
            # counts as 0 ms, so the column stays a median over every run.
            values = [step_ms(run["summary"], step_name) for run in runs.get(name, [])]
            cells.append(f"{statistics.median(values):.0f}" if values else "-")
        print(f"| {step_name} | " + " | ".join(cells) + " |")


def print_details(work, runs):
    print("\n| case | files sent | MB sent (compressed) | outcome |")
    print("|---|---|---|---|")
    for name in ["first", "cold", "delta", "full", "unchanged", "rollback", "large"]:
        for run in runs.get(name, [])[:1]:
            summary = run["summary"]
            sent = summary.get("bytes_sent")
            megabytes = "-" if sent is None else f"{sent / 1e6:.1f}"
            files = summary.get("files_sent")
            print(
                f"| {name} | {'-' if files is None else files} | {megabytes} "
                f"| {summary['outcome']} |"
            )
    if "large" in runs:
        run = runs["large"][0]
        print(
            f"\n1 GB app, delta off: wall {run['wall'] / 1000:.1f} s, upload "
            f"{step_ms(run['summary'], 'upload') / 1000:.1f} s, client peak RSS "
            f"{run['rss_kb'] / 1024:.1f} MB (target < 50 MB)."
        )
    connections = work / "connections.tsv"
    if connections.exists():
        print("\n| case | connect() calls to port 22 |")
        print("|---|---|")
        for line in connections.read_text().splitlines():
            name, count = line.split("\t")
            print(f"| {name} | {count} |")


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: summarize.py WORK_DIR SETTLE_MS")
    work, settle_ms = Path(sys.argv[1]), int(sys.argv[2])
    runs = load_runs(work)
    print_times(runs, settle_ms)
    print_ratios(runs, settle_ms)
    print_steps(runs)
    print_details(work, runs)


if __name__ == "__main__":
    main()
