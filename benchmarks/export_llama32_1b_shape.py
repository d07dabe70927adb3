"""Export of a Llama-3.2-1B-shaped checkpoint (random weights) with the iPhone 15 Pro settings.

    python benchmarks/export_llama32_1b_shape.py [--out DIR]

dim 2048, 16 layers, 32 heads, 8 KV heads, hidden 8192, vocab 128256, rope theta
500000 with Llama 3 scaling, tied embeddings. Reports wall time and peak RSS of
`python -m ane_build.cli.export`: its largest process (wait4) and the sum over its process
tree (the twin lowers in a second process), which must fit this 24 GiB machine; then the
same with ANE_BUILD_JOBS=1 (the twin lowered after Core ML, in the same process).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import SETTINGS, timed  # the iPhone 15 Pro settings

PARAMS = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "head_dim": 64, "hidden_dim": 8192,
          "vocab_size": 128256, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
          "rope_scale_factor": 32.0, "high_freq_factor": 4.0}


def write_checkpoint(folder):
    import torch
    from safetensors.torch import save_file

    from ane_build.checkpoint import canonical

    gen = torch.Generator().manual_seed(0)
    weights = {}
    for name, shape in canonical.expected_shapes(PARAMS).items():
        if name == "output.weight":
            continue  # tied: the export reuses the embedding
        scale = 1.0 if name.endswith("norm.weight") else shape[-1] ** -0.5
        weights[name] = (torch.randn(shape, generator=gen) * scale).to(torch.float16)
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "params.json").write_text(json.dumps(PARAMS))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="llama1b-bench-")))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write_checkpoint(args.out)
    cmd = [sys.executable, "-m", "ane_build.cli.export", "-p", str(args.out / "params.json"),
           "-c", str(args.out / "model.safetensors"), "-n", str(args.out / "llama1b.pte"), *SETTINGS]
    print("| Llama-3.2-1B-shaped export | wall (s) | peak RSS, largest process (GB) | peak RSS, process tree (GB) "
          "| Core ML .pte (GB) | twin .pte (GB) |")
    print("|---|---|---|---|---|---|")
    for jobs, how in (("2", "twin beside Core ML (default)"), ("1", "ANE_BUILD_JOBS=1, twin after Core ML")):
        wall, process_mb, tree_mb = timed(cmd, args.out / f"export{jobs}.log", {"ANE_BUILD_JOBS": jobs})
        pte = args.out / "llama1b.pte"
        print(f"| iPhone 15 Pro settings, {how} | {wall:.0f} | {process_mb / 1024:.2f} | {tree_mb / 1024:.2f} | "
              f"{pte.stat().st_size / 2**30:.2f} | {pte.with_suffix('.twin.pte').stat().st_size / 2**30:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
