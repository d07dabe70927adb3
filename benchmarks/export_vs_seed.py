"""Export of the default model: ours (`python -m ane_build.cli.export`) beside the seed's export.py.

    python benchmarks/export_vs_seed.py [--checkpoint DIR] [--out DIR] [--repeat N]

Both get the same checkpoint (a .pth written from the default recipe's canonical
checkpoint) and the iPhone 15 Pro settings; each runs in its own process. Wall time
is the process's; peak memory is measured two ways: the process's own peak RSS
(wait4), and the peak of the RSS summed over its whole process tree, sampled from
/proc every 50 ms (what counts if a run ever spreads over several processes). Ours
also lowers the CPU twin. With --repeat N the two exports alternate N times and the
medians are reported. Ours runs twice: as it does by default (the twin lowered in a
second process beside Core ML) and with ANE_BUILD_JOBS=1 (the twin after Core ML, in
the same process). Prints a Markdown table with the ratios, and the .pte sizes against
the ideal size.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "smollm2-135m/iphone15pro"
SETTINGS = ["--seq_length", "64", "--max_seq_length", "1024", "--use_cache_list",
            "--target_split_size", "1024", "--max_splits", "8", "--coreml-quantize", "c4w", "--dtype", "fp16"]
SEED_COMMAND = [sys.executable, "-m", "executorch.examples.apple.coreml.llama.export"]


class TreeRss:
    """Peak of the RSS summed over a process and all its descendants, sampled from /proc.

    ``pss=True``: the proportional set size of anonymous and shared memory instead (``smaps_rollup``:
    Pss_Anon + Pss_Shmem), which counts a page shared by forked processes once in all, not once in
    each (RSS counts a child forked from a 12 GB process, a copy-on-write worker or a tool started
    by fork and exec, as another 12 GB it never takes), and leaves out mapped files' pages (the
    checkpoint, the programs written), which the kernel takes back under pressure: the memory a
    runner's limit must hold. Slower to read (it walks the page tables), so sampled less often."""

    def __init__(self, pid, interval=None, pss=False):
        self.pid, self.peak_kb = pid, 0
        self.interval, self.read = interval or (0.25 if pss else 0.05), _pss_kb if pss else _rss_kb
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self):
        self._done.set()
        self._thread.join()
        return self.peak_kb / 1024

    def _run(self):
        while not self._done.is_set():
            self.peak_kb = max(self.peak_kb, sum(self.read(p) for p in _tree(self.pid)))
            self._done.wait(self.interval)


def _tree(pid):
    """pid and its descendants (parent links read from /proc/<pid>/stat)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo.extend(children.get(out[-1], []))
    return out


def _pss_kb(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith(("Pss_Anon:", "Pss_Shmem:")))
    except OSError:
        return 0


def _rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed(cmd, log, env=None, cwd=ROOT, pss=False):
    """(wall seconds, peak RSS of the process in MB (wait4), peak RSS of its process tree in MB, or its
    PSS with ``pss``: see TreeRss). ``env``: variables to set for the command, on top of this process's."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env={**os.environ, **(env or {})})
        tree = TreeRss(proc.pid, pss=pss)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    tree_peak = tree.stop()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd[2]} failed; see {log}")
    return wall, usage.ru_maxrss / 1024, tree_peak


def recipe_view(stage):
    """The default recipe's view of ``stage``, where dodo.py puts it; exits when it is not built."""
    artifacts = Path(os.environ.get("ANE_BUILD_ARTIFACTS", ROOT / "artifacts"))  # as dodo.py reads it
    folder = (artifacts / "recipes" / RECIPE / stage).resolve()
    if not folder.is_dir():
        sys.exit(f"{folder}: not built; run `doit {stage}:{RECIPE}` first")
    return folder


def canonical_checkpoint():
    subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), f"convert:{RECIPE}"],
                   check=True, capture_output=True, cwd=ROOT)
    return recipe_view("convert")


def write_pth(ckpt, out):
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(str(ckpt / "model.safetensors")), out / "model.pth")
    (out / "params.json").write_text((ckpt / "params.json").read_text())


def ideal_bytes(params):
    """Parameters x bits / 8 per tensor group: 4-bit linears (LM head included), fp16 embedding and norms."""
    dim, hidden, vocab, layers = params["dim"], params["hidden_dim"], params["vocab_size"], params["n_layers"]
    hd, heads, kv = params["head_dim"], params["n_heads"], params["n_kv_heads"]
    linear = layers * (dim * hd * (2 * heads + 2 * kv) + 3 * dim * hidden) + vocab * dim
    fp16 = vocab * dim + (2 * layers + 1) * dim
    return {"linear (4-bit)": linear * 4 // 8, "embedding + norms (fp16)": fp16 * 2}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", type=Path, help="canonical checkpoint (default: build the default recipe's)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="export-bench-")))
    ap.add_argument("--repeat", type=int, default=1, help="run the exports this many times, alternating")
    args = ap.parse_args()
    ckpt = args.checkpoint or canonical_checkpoint()
    args.out.mkdir(parents=True, exist_ok=True)
    write_pth(ckpt, args.out)
    files = ["-p", str(args.out / "params.json"), "-c", str(args.out / "model.pth")]
    ours = [sys.executable, "-m", "ane_build.cli.export", *files, *SETTINGS]
    # name: (command, environment). Ours twice: the twin beside Core ML (the default), and after it.
    commands = {
        "seed": ([*SEED_COMMAND, "-n", str(args.out / "seed.pte"), *files, *SETTINGS], {}),
        "ours": ([*ours, "-n", str(args.out / "ours.pte")], {"ANE_BUILD_JOBS": "2"}),
        "ours1": ([*ours, "-n", str(args.out / "ours1.pte")], {"ANE_BUILD_JOBS": "1"}),
    }
    runs = {name: [] for name in commands}
    loads = []
    for i in range(args.repeat):
        for name, (cmd, env) in commands.items():
            loads.append(os.getloadavg()[0])
            runs[name].append(timed(cmd, args.out / f"{name}.{i}.log", env))
            print(f"{name} run {i + 1}: {runs[name][-1][0]:.1f} s, {runs[name][-1][1]:.0f} MB (process), "
                  f"{runs[name][-1][2]:.0f} MB (tree)", file=sys.stderr)
    seed, ours, ours1 = ({k: statistics.median(r[k] for r in runs[name]) for k in range(3)} for name in commands)
    ideal = ideal_bytes(json.loads((ckpt / "params.json").read_text()))
    sizes = {name: (args.out / f"{name}.pte").stat().st_size for name in commands}
    median = f" (median of {args.repeat})" if args.repeat > 1 else ""
    print("| | seed export.py | ane-build export | ratio | ane-build export, ANE_BUILD_JOBS=1 | ratio |")
    print("|---|---|---|---|---|---|")
    for k, (what, unit) in enumerate((("wall", "s"), ("peak RSS, process", "MB"), ("peak RSS, process tree", "MB"))):
        digits = 1 if unit == "s" else 0
        print(f"| {what} ({unit}){median} | {seed[k]:.{digits}f} | {ours[k]:.{digits}f} | {ours[k] / seed[k]:.2f}x | "
              f"{ours1[k]:.{digits}f} | {ours1[k] / seed[k]:.2f}x |")
    print(f"| Core ML .pte (MB) | {sizes['seed'] / 1e6:.1f} | {sizes['ours'] / 1e6:.1f} | "
          f"{sizes['ours'] / sizes['seed']:.3f}x | {sizes['ours1'] / 1e6:.1f} | {sizes['ours1'] / sizes['seed']:.3f}x |")
    total = sum(ideal.values())
    print(f"\nIdeal size {total / 1e6:.1f} MB (" + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in ideal.items())
          + f"); ours is {sizes['ours'] / total:.3f}x the ideal, the seed's {sizes['seed'] / total:.3f}x.")
    print(f"Load average (1 min) at each start: {', '.join(f'{x:.2f}' for x in loads)}.")


if __name__ == "__main__":
    main()
