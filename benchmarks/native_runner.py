"""Decode speed of the native runner (runner/, over ctypes) beside the project's Python runner, on one .pte.

    python benchmarks/native_runner.py TWIN.pte [--tokens 64] [--prompt-length 16] [--repeat 3] [--library PATH]

Both feed the same prompt, then generate --tokens ids greedily with stop ids off, each run in turn
--repeat times; the medians are reported as a markdown table, with the ratio of decode speeds and
whether both generated the same ids. The Python runner is ``ane_build.runtime`` (``Generation`` over
``PteProgram``, as ``ane-build run`` drives a program). Both call the same ExecuTorch kernels in one
process, so the difference is the loop around them: input preparation, cache writes, sampling.

Timed alike on both sides (``Generation``'s own split): prefill is the prompt's calls and the first
id's sampling; decode is each later id, fed back as one call and sampled from its logits, so
decode tokens/s = (tokens - 1) / decode seconds. Without --library the runner is built into
runner/build first.
"""

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runner" / "python"))
import ane_runner_ctypes as native

from ane_build.runtime.generate import Generation
from ane_build.runtime.program import PteProgram
from ane_build.runtime.sampling import Sampler


def build_library():
    build = ROOT / "runner" / "build"
    for command in (["cmake", "-S", str(ROOT / "runner"), "-B", str(build), f"-DANE_RUNNER_PYTHON={sys.executable}"],
                    ["cmake", "--build", str(build), "-j2"]):
        subprocess.run(command, check=True, capture_output=True)
    return next(p for p in build.iterdir() if p.name.startswith("libane_runner."))


def time_native(runner, prompt, n):
    """(prefill s, decode s, ids): n ids, the last sampled and not fed (as Generation leaves it)."""
    runner.reset()
    start = time.perf_counter()
    assert runner.prefill(prompt) == native.Status.OK, runner.error
    status, first = runner.next()  # samples only: the prompt's logits are there
    prefilled = time.perf_counter()
    assert status == native.Status.OK, runner.error
    ids = [first]
    for _ in range(n - 1):
        status, token = runner.next()  # feeds the previous id, then samples
        assert status == native.Status.OK, runner.error
        ids.append(token)
    return prefilled - start, time.perf_counter() - prefilled, ids


def time_python(program, prompt, n):
    """(prefill s, decode s, ids), as Generation times them."""
    generation = Generation(program, prompt, Sampler(0.0), n)
    ids = list(generation)
    assert len(ids) == n
    return generation.stats.prefill_seconds, generation.stats.decode_seconds, ids


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pte", type=Path, help="a .pte of the convention (forward, prefill), e.g. twin.pte")
    parser.add_argument("--tokens", type=int, default=64, help="ids generated per run (at least 2)")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--library", type=Path, help="libane_runner to use (default: build runner/ first)")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens: at least 2 (decode starts with the second id)")

    lib = native.load(args.library or build_library())
    program = PteProgram(args.pte)
    with native.Runner(lib, args.pte) as runner:
        info = runner.info()
        if args.prompt_length + args.tokens > info.max_seq_length:
            parser.error(f"--prompt-length + --tokens passes the context ({info.max_seq_length})")
        runner.set_stop_ids([])
        prompt = [1 + (7 * i) % (info.vocab_size - 1) for i in range(args.prompt_length)]
        runs = {"native": [], "python": []}
        for _ in range(args.repeat):  # in turn, so drift in the machine's speed hits both alike
            runs["native"].append(time_native(runner, prompt, args.tokens))
            runs["python"].append(time_python(program, prompt, args.tokens))
    report(args, info, runs)


def report(args, info, runs):
    print(f"{args.pte}: {info.n_layers} layers, vocab {info.vocab_size}, cache {info.cache_len}, "
          f"fp{info.dtype_bits}; prompt {args.prompt_length} ids, {args.tokens} generated, median of "
          f"{args.repeat}; CPU: {cpu_name()}\n")
    labels = {"native": "native (runner/, ctypes)", "python": "Python (ane_build.runtime)"}
    print("| runner | prefill tokens/s | decode tokens/s |")
    print("|---|---:|---:|")
    decode = {}
    for name, results in runs.items():
        prefill = args.prompt_length / statistics.median(r[0] for r in results)
        decode[name] = (args.tokens - 1) / statistics.median(r[1] for r in results)
        print(f"| {labels[name]} | {prefill:.1f} | {decode[name]:.1f} |")
    print(f"\nnative / Python decode: {decode['native'] / decode['python']:.2f}x")
    same = all(n[2] == p[2] for n, p in zip(runs["native"], runs["python"]))
    print(f"greedy ids: {'the same' if same else 'DIFFERENT'} in both runners")


if __name__ == "__main__":
    main()
