"""The remote cache on the default recipe, side by side: a cold `doit`, the same cold `doit` pushing to
an S3-protocol server on 127.0.0.1, then `doit` on an empty local store from that warm remote.

    python benchmarks/remote_cache.py [--out DIR]

Each `doit` (the default task: the default recipe through release) starts from an empty artifacts
folder, in its own process. The server is moto's (what the tests run against), in a process of its
own: unlike a real remote it shares this machine's cores with the build, so its CPU time is reported,
and the pushing build runs twice: beside a server at the build's priority, and beside one at the
lowest (niceness 19), which takes the CPU only when the build leaves it: the nearest this machine
comes to a remote on hardware of its own. A pushing `doit` exits once its pushes are done, so their
cost is in its wall time, and so is any of the server's work still left then. Prints a Markdown
table: wall time, the stages each run built, pulled or left in the remote, and the two ratios the
issue sets (warm <= 0.1x the cold build, with no stage run; cold with push <= 1.1x cold without).
"""

import argparse
import os
import re
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


def build(name, out, env):
    """(wall s, {verb: stages}, load average at the start) of one `doit` from an empty artifacts folder."""
    env = {"ANE_BUILD_ARTIFACTS": str(out / f"artifacts-{name}"), "ANE_BUILD_CONFIG": str(out / "none.toml"), **env}
    load = os.getloadavg()[0]
    log = out / f"{name}.log"
    wall = timed([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py")], log, env)[0]
    lines = re.findall(r"^(built|pulled|remote|cached) +(\w+):", log.read_text(), re.M)
    stages = {verb: [stage for v, stage in lines if v == verb] for verb in VERBS}
    print(f"{name}: {wall:.1f} s, " + ", ".join(f"{v} {', '.join(s)}" for v, s in stages.items() if s),
          file=sys.stderr)
    return wall, stages, load


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="remote-bench-")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("ANE_BUILD_CACHE", None)
    server_cpu = {}
    with s3_server.process() as s3:
        remote = {**s3.env, "ANE_BUILD_CACHE": s3.url("bench")}
        runs = {"cold": build("cold", args.out, {})}
        server_cpu["cold, pushing"] = cpu_seconds(s3.pid)
        runs["cold, pushing"] = build("cold-push", args.out, remote)
        server_cpu["cold, pushing"] = cpu_seconds(s3.pid) - server_cpu["cold, pushing"]
        runs["warm remote, empty local store"] = build("warm", args.out, remote)
        stored = sum(1 for key in s3.keys("bench/") if key.endswith("/manifest.json"))
    with s3_server.process(niceness=19) as s3:
        name = "cold, pushing to a server at niceness 19"
        runs[name] = build("cold-push-niced", args.out, {**s3.env, "ANE_BUILD_CACHE": s3.url("bench")})
        server_cpu[name] = cpu_seconds(s3.pid)
    cold = runs["cold"][0]
    print("| `doit`, default recipe, empty artifacts folder | wall (s) | x cold | built | pulled | left in the remote |")
    print("|---|---|---|---|---|---|")
    for name, (wall, stages, _) in runs.items():
        print(f"| {name} | {wall:.1f} | {wall / cold:.3f}x | {', '.join(stages['built']) or 'none'} | "
              f"{', '.join(stages['pulled']) or '-'} | {', '.join(stages['remote']) or '-'} |")
    print(f"\nThe pushing build left {stored} entries in the remote. The S3 server's CPU (on this machine's cores, "
          "beside the build): " + "; ".join(f"{name}: {t:.1f} s" for name, t in server_cpu.items()) + ".")
    print("Load average (1 min) at each start: " + ", ".join(f"{r[2]:.2f}" for r in runs.values()) + ".")


if __name__ == "__main__":
    main()
