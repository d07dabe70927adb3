"""Export, convert, smoke and release entries of the tiny Llama for the smoke and release tests.

An export entry is assembled rather than exported: its CPU twin lowered as the export stage
lowers it, spec.json, params.json and the SentencePiece tokenizer as the stage writes them, and a stand-in
for the Core ML model.pte (no runtime here runs one, and the release only copies it).

Lowering a twin takes seconds, so each entry is built once per test session and shared by
the test modules through a module-level cache (a session fixture imported into two modules
would be built twice).
"""

import json
import shutil

from ane_build import recipe
from ane_build.analysis import cost
from ane_build.checkpoint import canonical
from ane_build.model import io
from ane_build.stages import export, quantize, release, rewrite, smoke
from tests.runtime.tiny_programs import MAX, SEQ
from tests.stages.tiny_entries import ane
from tests.tiny_llama import sentencepiece_model, tiny_params, tiny_weights

# model.pte is a stand-in here (see export_entry): nothing to interpret (tests/stages/test_smoke_coreml.py
# builds real Core ML programs).
SMOKE = {"prompts": ["the quick brown fox", "a lazy dog sleeps"], "n_steps": 12, "min_top1_agreement": 1.0,
         "eval_tokens": 100,  # three windows of the tiny program's cache
         "temperature": 0.0, "interpret_coreml": False}
CORE_ML_STAND_IN = b"stands in for the Core ML program: nothing here can run one"
STAGE_KEYS = {name: f"{i:064x}" for i, name in enumerate(("fetch", "convert", "rewrite", "quantize", "export",
                                                          "smoke", "release"))}
_built = {}


def with_nan(weights):
    weights["norm.weight"][0] = float("nan")  # the last norm: every logit is NaN
    return weights


def with_zero_output(weights):
    weights["output.weight"].zero_()  # every logit 0: greedy picks token 0 at every step
    return weights


# name -> what is done to the tiny weights. Forward-only programs: the runtime's tests cover decode.
VARIANTS = {"fp32": lambda w: w, "nan": with_nan, "zero-output": with_zero_output}


def entries(tmp_path_factory, variant="fp32"):
    """{"convert": dir, "export": dir} of the tiny model with ``variant``'s weights (built once)."""
    if variant not in _built:
        root = tmp_path_factory.mktemp(variant)
        convert = convert_entry(root / "convert", VARIANTS[variant](tiny_weights(tiny_params())))
        _built[variant] = {"convert": convert, "export": export_entry(root, convert)}
    return _built[variant]


# A Llama 2-like chat template over the tiny SentencePiece tokenizer's <s> and </s>.
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} "
                 "[/INST]{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")


def chat_entries(tmp_path_factory):
    """The fp32 entries as a chat model's: its export entry (copied) with a chat template beside the
    tokenizer, as convert and the stages after it carry one (built once)."""
    if "chat" not in _built:
        fp32 = entries(tmp_path_factory)
        export_dir = tmp_path_factory.mktemp("chat") / "export"
        shutil.copytree(fp32["export"], export_dir)
        (export_dir / canonical.CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE)
        io.write_spec({**io.read_spec(export_dir), "chat_template": canonical.CHAT_TEMPLATE_FILE}, export_dir)
        _built["chat"] = {**fp32, "export": export_dir}
    return _built["chat"]


def convert_entry(folder, weights):
    """A canonical checkpoint of the tiny params with the SentencePiece tokenizer (bos 1, eos 2)."""
    folder.mkdir(parents=True)
    canonical.write(canonical.Checkpoint(tiny_params(), weights, "tokenizer.model", sentencepiece_model(),
                                         bos_id=1, eos_ids=[2]), folder)
    return folder


def export_entry(root, convert):
    """An fp32, unquantized export entry of ``convert`` (see the module doc)."""
    # The default window (max_seq_length - seq_length) holds every smoke position: agreement can be exact.
    ane_params = ane(dtype="fp32", seq_length=SEQ, max_seq_length=MAX)
    dirs = {"convert": convert}
    for name, module, params, upstream in (("rewrite", rewrite, ane_params, "convert"),
                                           ("quantize", quantize, {"linear": "none"}, "rewrite")):
        dirs[name] = root / name
        dirs[name].mkdir()
        module.run({upstream: dirs[upstream]}, params, dirs[name])
    spec, out = io.read_spec(dirs["quantize"]), root / "export"
    out.mkdir()
    metadata = io.runner_metadata(spec)
    export.write_pte(export.lower_twin(export.load_programs(dirs["quantize"], spec), io.constant_methods(spec)),
                     out / export.TWIN_FILE)
    (out / export.MODEL_FILE).write_bytes(CORE_ML_STAND_IN)
    methods = {m: {"partitions": 1, "delegated_ops": 1, "cpu_ops": {}} for m in io.methods(spec["ane"])}
    export.write_report({"delegated_share": 1.0, "coreml_partitions": len(methods), "methods": methods}, out)
    shutil.copyfile(dirs["quantize"] / spec["tokenizer"], out / spec["tokenizer"])
    io.write_params(spec, out)
    io.write_spec({**spec, "export": export.resolve({}, spec), "metadata": metadata}, out)
    cost.write(spec, out)
    return out


def run_smoke(inputs, out_dir, **overrides):
    out_dir.mkdir(parents=True)
    return smoke.run(inputs, {**SMOKE, **overrides}, out_dir)


def tiny_recipe(chat=False, **release_section):
    """A resolved recipe as recipe.load makes it, its source a local folder."""
    rec = recipe.validate({"source": {"path": "/home/someone/models/tiny"}, "device": "Tiny Phone", "chat": chat,
                           "smoke": SMOKE, "release": release_section}, "recipes/tiny/phone.yaml")
    return {**rec, "name": "tiny/phone", "path": "recipes/tiny/phone.yaml"}


def run_release(inputs, out_dir, rec=None):
    out_dir.mkdir(parents=True)
    return release.run(inputs, {"recipe": rec or tiny_recipe(), "stage_keys": STAGE_KEYS}, out_dir)


def released(tmp_path_factory):
    """{"export", "smoke", "release": entry dirs} of the fp32 tiny model, built once."""
    if "release" not in _built:
        root = tmp_path_factory.mktemp("released")
        inputs = {**entries(tmp_path_factory), "smoke": root / "smoke"}
        run_smoke(inputs, inputs["smoke"])
        run_release(inputs, root / "release")
        _built["release"] = {**inputs, "release": root / "release"}
    return _built["release"]


def bundle(tmp_path_factory):
    """The tiny release's bundle folder (tiny-phone/)."""
    return released(tmp_path_factory)["release"] / "tiny-phone"


def read_json(path):
    return json.loads(path.read_text())
