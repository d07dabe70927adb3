"""The remote cache on the default recipe, side by side: a cold `doit`, the same cold `doit` pushing to
an S3-protocol server on 127.0.0.1, then `doit` on an empty local store from that warm remote.

    python benchmarks/remote_cache.py [--out DIR] [--repeat N]

Each `doit` (the default task: the default recipe through release) starts from an empty artifacts
folder, in its own process. The server is moto's (what the tests run against), in a process of its
own: unlike a real remote it shares this machine's cores with the build, so its CPU time is reported,
and the pushing build runs twice: beside a server at the build's priority, and beside one at the
lowest (niceness 19), which takes the CPU only when the build leaves it: the nearest this machine
comes to a remote on hardware of its own. A pushing `doit` exits once its pushes are done, so their
cost is in its wall time, and so is any of the server's work still left then. Prints a Markdown
table: wall time and the CPU time of the build's own processes (with --repeat N, medians of the
three cold builds run in turn N times), the stages each run built, pulled or left in the remote,
and the two ratios the issue sets (warm <= 0.1x the cold build, with no stage run; cold with push
<= 1.1x cold without), then every run.
"""

import argparse
import os
import re
import resource
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import ROOT, timed

sys.path.insert(0, str(ROOT))
from tests import s3_server  # noqa: E402

VERBS = ("built", "pulled", "remote", "cached")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build(name, out, env):
    """(wall s, {verb: stages}, load average at the start, CPU s of the doit process tree) of one
    `doit` from an empty artifacts folder."""
    env = {"ANE_BUILD_ARTIFACTS": str(out / f"artifacts-{name}"), "ANE_BUILD_CONFIG": str(out / "none.toml"), **env}
    load, cpu = os.getloadavg()[0], children_cpu_seconds()
    log = out / f"{name}.log"
    wall = timed([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")], log, env)[0]
    cpu = children_cpu_seconds() - cpu  # doit's, and its reaped processes' (the twin's, quantize's fork)
    lines = re.findall(r"^(built|pulled|remote|cached) +(\w+):", log.read_text(), re.M)
    stages = {verb: [stage for v, stage in lines if v == verb] for verb in VERBS}
    print(f"{name}: {wall:.1f} s, " + ", ".join(f"{v} {', '.join(s)}" for v, s in stages.items() if s),
          file=sys.stderr)
    return wall, stages, load, cpu


PUSHING, NICED = "cold, pushing", "cold, pushing to a server at niceness 19"
WARM = "warm remote, empty local store"
SLUGS = {PUSHING: "push", NICED: "push-niced"}  # their logs and artifacts folders


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="remote-bench-")))
    ap.add_argument("--repeat", type=int, default=1, help="run the three cold builds this many times, in turn")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("ANE_BUILD_CACHE", None)
    with s3_server.process() as s3, s3_server.process(niceness=19) as niced:
        runs, server_cpu = {"cold": [], PUSHING: [], NICED: []}, {PUSHING: [], NICED: []}
        for i in range(args.repeat):
            runs["cold"].append(build(f"cold-{i}", args.out, {}))
            for name, server in ((PUSHING, s3), (NICED, niced)):
                before = cpu_seconds(server.pid)
                runs[name].append(build(f"{SLUGS[name]}-{i}", args.out,
                                        {**server.env, "ANE_BUILD_CACHE": server.url(f"bench{i}")}))
                server_cpu[name].append(cpu_seconds(server.pid) - before)
        last = f"bench{args.repeat - 1}"
        runs[WARM] = [build("warm", args.out, {**s3.env, "ANE_BUILD_CACHE": s3.url(last)})]
        stored = sum(1 for key in s3.keys(f"{last}/") if key.endswith("/manifest.json"))
    report(runs, server_cpu, stored)


def report(runs, server_cpu, stored):
    walls = {name: statistics.median(run[0] for run in r) for name, r in runs.items()}
    cpus = {name: statistics.median(run[3] for run in r) for name, r in runs.items()}
    median = ", median" if len(runs["cold"]) > 1 else ""
    print(f"| `doit`, default recipe, empty artifacts folder | wall (s{median}) | x cold | its CPU (s{median}) | "
          "x cold | built | pulled | left in the remote |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        stages = r[-1][1]
        print(f"| {name} | {walls[name]:.1f} | {walls[name] / walls['cold']:.3f}x | {cpus[name]:.1f} | "
              f"{cpus[name] / cpus['cold']:.3f}x | "
              f"{', '.join(stages['built']) or 'none'} | {', '.join(stages['pulled']) or '-'} | "
              f"{', '.join(stages['remote']) or '-'} |")
    print(f"\nThe last pushing build left {stored} entries in the remote.")
    print("Runs in order (wall s, CPU s, load average at the start): " + "; ".join(
        f"{name} " + ", ".join(f"{w:.1f} ({cpu:.1f}, {load:.2f})" for w, _, load, cpu in r)
        for name, r in runs.items()) + ".")
    print("The S3 server's CPU while a build pushed (on this machine's cores, beside the build), s: " + "; ".join(
        f"{name} " + ", ".join(f"{t:.1f}" for t in times) for name, times in server_cpu.items()) + ".")


if __name__ == "__main__":
    main()
