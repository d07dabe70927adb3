"""The README.md of a release bundle: what an app developer needs to ship ``model.pte``.

It is rendered from the bundle's ``manifest.json`` alone (every number in it is the
manifest's; every mapping in sorted order, as the manifest is written), so ``ane-build verify``
can render it again and find a README that was edited
or belongs to another build. The manifest lists the README's own sha256 too; that entry is
left out of what the README says.
"""

import json

README = "README.md"
# The OS releases that run a Core ML model of each minimum deployment target (Core ML
# specification 7, 8, 9).
OS_RELEASES = {"iOS16": "iOS/iPadOS 16, macOS 13", "iOS17": "iOS/iPadOS 17, macOS 14",
               "iOS18": "iOS/iPadOS 18, macOS 15"}
COMPUTE_UNITS = {
    "CPU_AND_NE": "the CPU and the Neural Engine",
    "ALL": "the CPU, the GPU and the Neural Engine",
    "CPU_AND_GPU": "the CPU and the GPU",
    "CPU_ONLY": "the CPU",
}


def render(manifest):
    """The README text for ``manifest`` (a bundle manifest as the release stage writes it)."""
    recipe, meta = manifest["recipe"], manifest["runner_metadata"]
    lines = [f"# {manifest['bundle']}", "",
             f"{recipe.get('description') or recipe['name']} for {manifest['device'] or 'any device'}, "
             f"built by ane-build from the recipe `{recipe['name']}`.", ""]
    lines += _files(manifest) + _requirements(manifest) + _loading(manifest) + _calls(meta, manifest)
    lines += _run(manifest)
    lines += _quality(manifest["smoke"]) + _speed(manifest["decode_cost"])
    return "\n".join(lines) + "\n"


def _files(manifest):
    files = {name: f for name, f in manifest["files"].items() if name != README and "/" not in name}
    rows = [f"| `{name}` | {f['size']:,} | `{f['sha256'][:16]}…` |" for name, f in sorted(files.items())]
    folders = {}  # a folder's files are one row: manifest.json lists each
    for name, f in manifest["files"].items():
        if "/" in name:
            folders.setdefault(name.split("/")[0], []).append(f["size"])
    rows += [f"| `{folder}/` | {sum(sizes):,} | {len(sizes)} files: each in `manifest.json` |"
             for folder, sizes in sorted(folders.items())]
    return ["## Files", "", "| file | bytes | sha256 |", "|---|---|---|", *rows, "",
            "`manifest.json` lists each file's full sha256 and how the bundle was made; "
            "`ane-build verify <this folder>` checks every file against it, this README included. "
            f"Reproducible: {manifest['reproducible']}.", ""]


def _lint(found):
    if found is None:
        return "- The Neural Engine lint was off for this build."
    allowed = f" ({found['allowlisted']} allowlisted findings: `lint.md`)"
    if found["clean"]:
        return f"- `ane-build lint` finds nothing the Neural Engine is reported not to take{allowed}."
    rules = ", ".join(f"{rule} ({n})" for rule, n in sorted(found["by_rule"].items()))
    return f"- `ane-build lint` finds ops the Neural Engine is reported not to take: {rules}{allowed}."


def _requirements(manifest):
    export, toolchain = manifest["recipe"]["export"], manifest["toolchain"]
    target = export["minimum_deployment_target"]
    return ["## Requirements", "",
            f"- {OS_RELEASES.get(target, target)} or later (Core ML minimum deployment target {target}).",
            f"- Core ML compute units: `{export['compute_unit']}` ({COMPUTE_UNITS[export['compute_unit']]}), "
            "compiled into the program: the app sets nothing.",
            _lint(manifest["ane_lint"]),
            f"- The ExecuTorch {toolchain['executorch']} runtime with its Core ML backend: the Swift package "
            f"https://github.com/pytorch/executorch at branch `swiftpm-{toolchain['executorch']}`, products "
            "`executorch` and `backend_coreml`. Link the backend into the app target with the linker flag "
            "`-all_load` (or `-force_load` of it), so that it registers itself at startup.", ""]


def _loading(manifest):
    first = min(manifest["methods"])  # any method loads the program; the same one every time
    return ["## Loading", "", "```swift", "import ExecuTorch", "",
            'let module = Module(filePath: Bundle.main.path(forResource: "model", ofType: "pte")!)',
            f'try module.load("{first}")  // compiles the Core ML model on first use: load before the user waits',
            "```", "",
            f"The tokenizer is `{manifest['tokenizer']}` (ExecuTorch's `pytorch-tokenizers` reads it: "
            "`tokenizers::HFTokenizer` for a `.json`, `tokenizers::SPTokenizer` for a SentencePiece `.model`).", "",
            *_chat(manifest),
            "The program speaks upstream ExecuTorch's calling convention for static-shape LLMs with "
            "caller-owned caches (`StaticAttentionIOManager`, `style=\"smart_mask\"`; "
            "`examples/apple/coreml/llama/export_static_llm_coreml.py`), so upstream's "
            "`run_static_llm_multifunction.py` drives it with `params.json` and the tokenizer, and ane-build's "
            "runners (`ane-build run`, and the native runner under `runner/` with a C ABI) are references of "
            "the loop the next section describes. ExecuTorch's `TextLLMRunner` (`ExecuTorchLLM`) does not: it "
            "drives programs that keep their caches inside.", ""]


def _chat(manifest):
    """How a chat model reads a user's message (bundles from before chat templates say nothing)."""
    if not manifest.get("chat_template"):
        return []
    chat = manifest["recipe"].get("chat")
    return [f"`{manifest['chat_template']}` is the checkpoint's chat template (Jinja, as Hugging Face's "
            "`tokenizer_config.json` holds it). "
            + ("The model is chat-tuned: render the conversation with it (`add_generation_prompt` true; Hugging "
               "Face's swift-transformers renders such templates on device), encode the text with the special "
               "tokens it writes as those tokens and nothing added (the template writes bos where the model wants "
               "one), and generate until a token of `eos_ids`, which include the one that ends the assistant's "
               "turn. `ane-build run --chat` does this."
               if chat else "The recipe did not build it as a chat model: its smoke prompts were plain text."), ""]


def _calls(meta, manifest):
    cache, n_kv, hd, n_layers = meta["cache_size"], meta["n_kv_heads"], meta["head_dim"], meta["n_layers"]
    caches = (f"{n_layers} key caches, then {n_layers} value caches, each `[1, {n_kv}, {cache}, {hd}]`"
              if meta["use_cache_list"] else
              f"one key cache and one value cache, each `[{n_layers}, 1, {n_kv}, {cache}, {hd}]`")
    calls = ", ".join(f"`{name}` ({n} token{'s' if n > 1 else ''} per call)"
                      for name, n in sorted(manifest["methods"].items()))
    constants = ", ".join(f"`{name}` = {json.dumps(value)}" for name, value in sorted(meta.items()))
    dtype = meta["dtype"]
    return ["## Calls", "",
            f"Methods: {calls}; they share the caches. Each takes, in order: `tokens` `[1, S]` int32 (the "
            f"call's tokens, padded with 0); `mask` `[1, S, {cache} + S]` ({dtype}, additive: 0 where a row "
            "may attend, a large negative value or -inf where not; the first columns are the cache slots, "
            "open once filled, the last S the call's own tokens, causal); `freqs_cos` and `freqs_sin` "
            f"`[S, {hd // 2}]` ({dtype}: rows `position .. position + S - 1` of the constant methods of the same "
            f"names); {caches} ({dtype}); `last_valid_token_pos` `[1]` int64 (the index of the last real "
            "token).", "",
            f"Each returns the logits of that token, `[1, {meta['vocab_size']}]`, then the call's new key rows "
            f"and then its new value rows, `[1, {n_kv}, S, {hd}]` per layer. The caller writes the real rows "
            f"into its caches at slots `position % {cache}` (a ring: past {cache} positions the oldest is "
            "overwritten), opens those slots in the mask, and keeps counting positions (rotary positions are "
            "absolute).", "",
            f"Constant methods (no input, one value each): {constants}; and `freqs_cos`, `freqs_sin` "
            f"`[{meta['max_seq_length']}, {hd // 2}]`, the rotary table.", ""]


def _run(manifest):
    """How an app runs the program with the bundle's native runner (bundles from before it say nothing)."""
    if not any(name.startswith("runner/") for name in manifest["files"]):
        return []
    executorch = manifest["toolchain"]["executorch"]
    return ["## Run it", "",
            "`runner/` holds the sources of ane-build's native runner: a C++17 library over the ExecuTorch runtime "
            "that owns the caches and makes the calls above, with a C ABI (`runner/include/ane_runner.h` documents "
            "each function; `runner/README.md`). Link the Swift package https://github.com/pytorch/executorch at "
            f"branch `swiftpm-{executorch}`, products `executorch` and `backend_coreml` (the backend with "
            "`-all_load`, or `-force_load` of it, as Requirements says; and `kernels_optimized` if "
            "`delegation.txt` lists ops left on the CPU), then either:", "",
            "- add `runner/src` and `runner/include` to the app's Xcode target (C++17: their ExecuTorch headers, "
            "`executorch/extension/module/module.h` and `executorch/extension/tensor/tensor.h`, come with the "
            "`executorch` product), with `runner/include` in its header search paths and its Swift import paths "
            "(`SWIFT_INCLUDE_PATHS`), so that Swift can `import ANERunner` (`runner/include/module.modulemap`); or",
            "- build `runner/` with CMake against ExecuTorch's Apple build (ExecuTorch built from source for iOS "
            "or macOS with its Core ML backend, and installed): `cmake -S runner -B runner/build-ios -G Xcode "
            "-DCMAKE_SYSTEM_NAME=iOS -DCMAKE_PREFIX_PATH=<that install> -DANE_RUNNER_COREML=ON "
            "-DBUILD_SHARED_LIBS=OFF && cmake --build runner/build-ios --config Release --target ane_runner`, "
            "and link `libane_runner.a` with that install's libraries, `runner/include` in the import paths. "
            "On a Mac, `cmake -S runner -B runner/build -DANE_RUNNER_COREML=ON` builds it against the macOS "
            "`executorch` Python wheel, with the `ane-runner` command-line tool.", "",
            "A decode loop in Swift over the C ABI; tokenization stays with the app (ids in, ids out):", "",
            "```swift", *_swift_loop(manifest["runner_metadata"].get("eos_ids") or []), "```", "",
            (f"`promptIds` is the conversation rendered with `{manifest['chat_template']}`, then encoded with "
             f"`{manifest['tokenizer']}` as Loading says"
             if manifest.get("chat_template") and manifest["recipe"].get("chat") else
             f"`promptIds` is the prompt encoded with `{manifest['tokenizer']}`")
            + "; decode the emitted ids with the same tokenizer. The loop opens the program each time to stay "
            "short, but `ane_runner_open` compiles the Core ML model on first use: an app opens it once, off the "
            "main thread, and keeps the handle (one per thread); `ane_runner_prefill` of a conversation's next turn "
            "continues it, `ane_runner_reset` starts a new one.",
            "",
            "This loop cannot be compiled or run on Linux, where ane-build builds and tests bundles: it needs "
            "Xcode, the ExecuTorch package's Apple frameworks and Core ML. The release workflow's Mac job builds "
            "`runner/` against the macOS wheel with `-DANE_RUNNER_COREML=ON` and runs the default bundle's "
            "`model.pte` with its `ane-runner` tool, which makes the same C calls.", ""]


def _swift_loop(eos_ids):
    return ["import Foundation",
            "import ANERunner  // runner/include/module.modulemap", "",
            "struct ANERunnerError: Error {",
            "    let message: String",
            "}", "",
            "/// Generates ids after `promptIds` and hands each to `emit`, until a stop id, a full context",
            "/// or `maxNewTokens`.",
            "func generate(promptIds: [Int32], maxNewTokens: Int, emit: (Int32) -> Void) throws {",
            '    guard let path = Bundle.main.path(forResource: "model", ofType: "pte") else {',
            '        throw ANERunnerError(message: "model.pte is not in the app bundle")',
            "    }",
            "    guard let runner = ane_runner_open(path) else {  // nil: ane_runner_last_error(nil) says why",
            "        throw ANERunnerError(message: String(cString: ane_runner_last_error(nil)))",
            "    }",
            "    defer { ane_runner_close(runner) }",
            "    func check(_ status: ane_runner_status) throws {  // a failed call leaves its message on the handle",
            "        if status != ANE_RUNNER_OK {",
            '            throw ANERunnerError(message: "status \\(status.rawValue): "',
            "                                 + String(cString: ane_runner_last_error(runner)))",
            "        }",
            "    }",
            f"    let stopIds: [Int32] = {json.dumps(eos_ids)}  // the program's eos_ids (the default); add the app's",
            "    try check(ane_runner_set_stop_ids(runner, stopIds, stopIds.count))",
            "    var sampling = ane_runner_sampling(temperature: 0, top_p: 1, seed: 0)  // greedy",
            "    try check(ane_runner_set_sampling(runner, &sampling))",
            "    try check(ane_runner_prefill(runner, promptIds, promptIds.count))",
            "    var id: Int32 = 0",
            "    for _ in 0..<maxNewTokens {",
            "        let status = ane_runner_next(runner, &id)",
            "        if status == ANE_RUNNER_STOPPED || status == ANE_RUNNER_CONTEXT_FULL { break }",
            "        try check(status)",
            "        emit(id)",
            "    }",
            "}"]


def _quality(smoke):
    eval_line = ("no evaluation text was scored" if smoke.get("eval_top1_agreement") is None else
                 f"on {smoke['eval_positions']} positions of English prose it did not write (Python's own "
                 "documentation), top-1 "
                 f"agreement {smoke['eval_top1_agreement']:.3f} and mean KL divergence "
                 f"{smoke['eval_mean_kld']:.4f}")
    return ["## Quality", "",
            f"Measured by the build's smoke test on `{smoke['program']}` ({smoke['backend']}) against the fp32 "
            f"checkpoint: top-1 agreement at least {smoke['min_top1_agreement']:.3f} on the smoke prompts; "
            f"{eval_line}. `smoke.md` shows the generations.", "", *_coreml_quality(smoke)]


def _coreml_quality(smoke):
    """What smoke measured on the Core ML program itself (manifests from before it did say nothing)."""
    if "coreml_min_top1_agreement" not in smoke or smoke["program"] == "model.pte":
        return []
    if smoke["coreml_min_top1_agreement"] is None:
        return ["The Core ML program itself was not run by this build's smoke test: the numbers above are its "
                "CPU twin's.", ""]
    eval_line = ("" if smoke.get("coreml_eval_top1_agreement") is None else
                 f"; on the first {smoke['coreml_eval_positions']} positions of the same text, top-1 agreement "
                 f"{smoke['coreml_eval_top1_agreement']:.3f} and mean KL divergence "
                 f"{smoke['coreml_eval_mean_kld']:.4f}")
    return ["The Core ML program in `model.pte` itself, run by the smoke test on Linux through ane-build's "
            "reference interpreter (each op in fp32, its output rounded to the program's dtype: a model of the Neural "
            f"Engine's arithmetic): top-1 agreement with the fp32 checkpoint at least "
            f"{smoke['coreml_min_top1_agreement']:.3f} on the smoke prompts{eval_line}; top-1 agreement with the "
            f"CPU twin at least {smoke['coreml_twin_min_top1_agreement']:.3f}.", ""]


def _speed(decode_cost):
    methods, bound = decode_cost["methods"], decode_cost["bound"]
    if not methods:
        return []
    rows = [f"| `{name}` | {m['tokens_per_call']} | {m['bytes_per_decoded_token'] / 1e6:.1f} | "
            f"{m['macs_per_call'] / 1e9:.2f} | {m['padding_waste']:.0%} |" for name, m in sorted(methods.items())]
    lines = ["## Decode cost", "", "Counted from the program's shapes, decoding one token per call:", "",
             "| method | tokens per call | MB read per token | GMACs per call | padding waste |",
             "|---|---|---|---|---|", *rows]
    if bound:
        lines += ["", f"On {bound['device']} ({bound['bandwidth_gb_s']} GB/s: {bound['source']}), memory "
                      f"bandwidth bounds decoding with `{bound['method']}` at **{bound['tokens_per_second_at_most']} "
                      "tokens/s at most**: an upper bound, not a measurement."]
    return lines
