"""The decode cost model of the default recipe: the seed's single 64-token method beside our decode method.

    python benchmarks/decode_cost.py [--export DIR]

The seed's program has one method, forward, taking seq_length (64) tokens a call: generating
feeds it one real token and 63 pads a call. Ours adds a one-token decode method. For each:
the counts of ``ane_build.analysis.cost`` (bytes read and MACs per decoded token, padding waste), the
memory-bandwidth bound on each recipe device, and, measured side by side on this host's CPU
through the CPU twin (both methods are in the same twin.pte), decode tokens/s. The bound is
an upper bound for a device, not a prediction; the host's speeds are the twin's, on this CPU.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ane_build.analysis import cost

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2-135m/iphone15pro"


def default_export():
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), f"export:{RECIPE}"],
                   check=True, capture_output=True, cwd=ROOT)
    return ROOT / "artifacts" / "recipes" / RECIPE / "export"


def host_tokens_per_second(twin, method, calls=20):
    """Median over ``calls`` one-token calls of ``method`` on the twin, as a generation makes them."""
    from ane_build.runtime.kv_cache import KVCache, feed
    from ane_build.runtime.program import PteProgram

    program = PteProgram(twin)
    cache = KVCache(program.info, program.methods, program.rope)
    feed(program, cache, list(range(100, 132)))  # a prompt's worth in the cache first
    seconds = []
    for token in range(calls):
        started = time.perf_counter()
        _, new_k, new_v = program.run(method, cache.prepare(method, [200 + token]))
        cache.commit(new_k, new_v, 1)
        seconds.append(time.perf_counter() - started)
    return 1 / statistics.median(seconds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--export", type=Path, help="an export entry (default: build the default recipe's)")
    args = ap.parse_args()
    export_dir = args.export or default_export()
    spec = json.loads((export_dir / "spec.json").read_text())
    methods = cost.costs(spec)
    sides = {"the seed's way: prefill, 64 tokens a call": "prefill", "ours: forward, 1 token a call": "forward"}
    devices = list(cost.DEVICE_BANDWIDTH)
    print("| method | MB read per token | GMACs per token | padding waste | "
          + " | ".join(f"bound on {d} (tokens/s)" for d in devices) + " | twin on this host (tokens/s) |")
    print("|---|---|---|---|" + "---|" * len(devices) + "---|")
    for label, method in sides.items():
        m = methods[method]
        bounds = [cost.decode_bound({method: m}, d)["tokens_per_second_at_most"] for d in devices]
        host = host_tokens_per_second(export_dir / "twin.pte", method)
        print(f"| {label} | {m['bytes_per_decoded_token'] / 1e6:.1f} | {m['macs_per_call'] / 1e9:.2f} | "
              f"{m['padding_waste']:.1%} | " + " | ".join(f"{b:.0f}" for b in bounds) + f" | {host:.1f} |")


if __name__ == "__main__":
    main()
