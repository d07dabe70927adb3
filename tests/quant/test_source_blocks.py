"""quantize.linear: source carries a GGUF's own blocks into the program (ane_build/quant/source_blocks.py).

A tiny GGUF whose attention weights are Q4_0, feed-forward weights Q4_1 and (tied, so also the
LM head's) embedding Q8_0 goes through the stages: convert, rewrite (splitting the 128-wide
linears and the 320-wide LM head on their rows), quantize (source) and export. Each linear's
weight, wherever it is read (the blocks file, the eager quantized model, the Core ML program
inside model.pte), is compared with what gguf's own dequantization of the file gives.

The bound, per weight w = (q - z) * s (q the block's integer, z its zero point, s its scale):
an fp16 program rounds three numbers to fp16, each by at most u = 2^-11 of itself: the zero
point (torchao casts it to the model's dtype; Core ML at fp16 precision stores the offset in
fp16), q - z (torchao subtracts in fp16; Core ML's scale for these types is GGUF's fp16 d,
exact, so its rounding is the product's), and the product. So
|w_program - w_gguf| <= u * |s| * (|z| + 2 |q - z|) + 2^-25 (an fp16 subnormal's half step)
+ 2^-22 * |s| * (|q| + |z|) (the fp32 roundings of the zero point and of gguf's own sum).
Both 4-bit types have z = 0 except Q4_1, whose z = -8 - m/d is where it counts: the "skewed"
block below (all weights positive, m/d ~ 100) has its zero point rounded by up to 2^-5 steps.
"""

import json
import logging

import numpy as np
import pytest
import torch
from torch.nn.utils import parametrize

from ane_build import recipe
from ane_build.checkpoint import blocks as checkpoint_blocks
from ane_build.checkpoint import canonical
from ane_build.model import io
from ane_build.model.rewrites import DTYPES
from ane_build.stages import convert, export, quantize, rewrite
from ane_build.util.errors import UserError
from tests import float_bounds
from tests.stages.tiny_entries import ane, build, later_call_inputs
from tests.tiny_llama import tiny_params, tiny_weights, write_gguf

SOURCE = {"linear": "source"}
TYPES = {"attention": "Q4_0", "feed_forward": "Q4_1", "tok_embeddings": "Q8_0"}
U16 = 2.0 ** -11


def gguf_type(name):
    return next(kind for part, kind in TYPES.items() if part in name)


def tiny_gguf(path):
    """The tiny model (tied embeddings) written with TYPES; returns gguf's dequantization of it."""
    from gguf import GGMLQuantizationType, quants

    params = tiny_params()
    weights = tiny_weights(params)
    w1 = weights["layers.0.feed_forward.w1.weight"]
    w1[0, :32] = 0.05  # a constant block: Q4_1's d is 0, every weight is m
    w1[1, 32:64] = 0.2 + 0.03 * torch.rand(32, generator=torch.Generator().manual_seed(1))  # skewed: m/d ~ 100
    weights["layers.0.attention.wq.weight"][2, :32] = 0  # Q4_0's d is 0
    raw = {name: (quants.quantize(t.numpy(), GGMLQuantizationType[gguf_type(name)]), gguf_type(name))
           for name, t in weights.items() if t.dim() == 2 and name != "output.weight"}
    return write_gguf(params, weights, path, raw=raw, tied=True)


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    """{stage: entry dir} from fetch through export (quantize: source), and gguf's weights."""
    root = tmp_path_factory.mktemp("source")
    (root / "fetch" / "source").mkdir(parents=True)
    written = tiny_gguf(root / "fetch" / "source" / "tiny.gguf")
    dirs = {"fetch": root / "fetch"}
    for stage, module, params, upstream in (("convert", convert, {}, "fetch"), ("rewrite", rewrite, ane(), "convert"),
                                            ("quantize", quantize, SOURCE, "rewrite"), ("export", export, {}, "quantize")):
        dirs[stage] = root / stage
        dirs[stage].mkdir()
        module.run({upstream: dirs[upstream]}, params, dirs[stage])
    return dirs, written


def allowed(blocks, reference):
    """The bound of the module docstring, per weight."""
    q = blocks.qdata.double().unflatten(1, (-1, blocks.block))
    s, z = blocks.scale.double()[..., None].abs(), blocks.zero.double()[..., None]
    bound = U16 * s * (z.abs() + 2 * (q - z).abs()) + 2.0 ** -25 + 2.0 ** -22 * s * (q.abs() + z.abs())
    return bound.flatten(1).expand_as(reference)


def fp32_allowed(blocks, reference):
    """Blocks dequantized in fp64 against gguf's fp32 sum: the fp32 roundings of z and of the sum."""
    q = blocks.qdata.double().unflatten(1, (-1, blocks.block))
    terms = blocks.scale.double()[..., None].abs() * (q.abs() + blocks.zero.double()[..., None].abs())
    return 2.0 ** -23 * (reference.abs() + terms.flatten(1))


def chunk_rows(name, rows):
    """(canonical weight name, its rows) of rewritten linear ``name`` (``<layer>.chunks.<i>``) ``rows`` wide."""
    layer, _, i = name.partition(".chunks.")
    start = int(i or 0) * rows
    return f"{layer}.weight", slice(start, start + rows)


# --- convert --------------------------------------------------------------------------------------

def test_convert_keeps_each_linears_blocks(entries):
    dirs, written = entries
    info = canonical.read_info(dirs["convert"])["source_blocks"]
    linears = [n for n, t in written.items() if t.dim() == 2 and n != "tok_embeddings.weight"]
    assert info["tensors"] == {n: {"type": gguf_type(n.replace("output", "tok_embeddings")),
                                   "bits": 8 if n == "output.weight" else 4, "block": 32} for n in linears}
    assert info["refused"] == {}
    source = checkpoint_blocks.load(dirs["convert"])
    stored = canonical.read_weights(dirs["convert"])
    for name, blocks in source.blocks.items():
        got = blocks.dequantize()
        assert torch.equal(stored[name], written[name]), name
        assert ((got - written[name]).abs() <= fp32_allowed(blocks, written[name])).all(), name
        bits = blocks.bits
        assert -(2 ** (bits - 1)) <= blocks.qdata.min().item() and blocks.qdata.max().item() < 2 ** (bits - 1), name
        # The scales are the file's fp16 d (or, in a constant block, its fp16 m): not fitted again.
        assert torch.equal(blocks.scale.half().float(), blocks.scale), name


def test_a_float_gguf_has_no_blocks_file(tmp_path):
    (tmp_path / "fetch" / "source").mkdir(parents=True)
    params = tiny_params()
    write_gguf(params, tiny_weights(params), tmp_path / "fetch" / "source" / "f.gguf", qtype="F16")
    (tmp_path / "convert").mkdir()
    convert.run({"fetch": tmp_path / "fetch"}, {}, tmp_path / "convert")
    assert not (tmp_path / "convert" / checkpoint_blocks.FILE).exists()
    assert "source_blocks" not in canonical.read_info(tmp_path / "convert")


# --- rewrite and quantize -------------------------------------------------------------------------

def test_rewrite_splits_the_blocks_with_their_rows(entries):
    dirs, _ = entries
    whole, split = checkpoint_blocks.load(dirs["convert"]), checkpoint_blocks.load(dirs["rewrite"])
    assert "output.chunks.4.weight" in split.blocks and "layers.0.feed_forward.w1.chunks.1.weight" in split.blocks
    for name, blocks in split.blocks.items():
        weight, rows = chunk_rows(name.removesuffix(".weight"), blocks.qdata.shape[0])
        for part in ("qdata", "scale", "zero"):
            assert torch.equal(getattr(blocks, part), getattr(whole.blocks[weight], part)[rows]), name


def test_the_quantized_model_holds_the_blocks(entries):
    dirs, written = entries
    source = checkpoint_blocks.load(dirs["rewrite"])
    model = quantize.quantized_model(dirs["rewrite"], SOURCE)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {f"{n}.weight" for n in linears} == set(source.blocks)
    for name, module in linears.items():
        assert parametrize.is_parametrized(module, "weight")
        weight, blocks = module.weight, source.blocks[f"{name}.weight"]
        assert torch.equal(weight.qdata, blocks.qdata) and torch.equal(weight.scale, blocks.scale)
        assert tuple(weight.block_size) == (1, 32) and weight.dtype == torch.float16
        canonical_name, rows = chunk_rows(name, weight.shape[0])
        reference = written[canonical_name][rows].double()
        error = (weight.dequantize().double() - reference).abs()
        assert (error <= allowed(blocks, reference)).all(), name


def test_the_bound_is_tight_enough_to_matter(entries):
    """The skewed Q4_1 block's fp16 zero point moves its weights by a visible fraction of a step,
    and the bound allows that much but not a step."""
    dirs, written = entries
    source = checkpoint_blocks.load(dirs["rewrite"])
    blocks = source.blocks["layers.0.feed_forward.w1.chunks.0.weight"]
    weight = quantize.quantized_model(dirs["rewrite"], SOURCE).layers[0].feed_forward.w1.chunks[0].weight
    reference = written["layers.0.feed_forward.w1.weight"][:64].double()
    error = (weight.dequantize().double() - reference).abs()[1, 32:64]
    step = blocks.scale[1, 1].item()
    assert error.max() > step / 100 and allowed(blocks, reference)[1, 32:64].max() < step / 2


def test_weight_groups_count_each_gguf_type_at_its_bits(entries):
    dirs, _ = entries
    p = tiny_params()
    groups = io.read_spec(dirs["quantize"])["quantize"]["weight_groups"]
    assert groups["linear:source:Q4_0"] == {"params": p["n_layers"] * (2 * 64 * 64 + 2 * 32 * 64), "bits": 4}
    assert groups["linear:source:Q4_1"] == {"params": p["n_layers"] * 3 * 64 * 128, "bits": 4}
    assert groups["linear:source:Q8_0"] == {"params": 320 * 64, "bits": 8}


def test_a_checkpoint_without_blocks_is_one_line(tmp_path):
    entries, _ = build(tmp_path, "rewrite")  # a float checkpoint
    (tmp_path / "quantize").mkdir()
    with pytest.raises(UserError) as err:
        quantize.run({"rewrite": entries["rewrite"]}, SOURCE, tmp_path / "quantize")
    message = str(err.value)
    assert message.startswith("quantize.linear=source: layer ") and "has no quantized blocks" in message
    assert "c8w" in message and "\n" not in message
    assert not any((tmp_path / "quantize").iterdir())


def test_a_layer_of_a_type_not_carried_is_named_with_its_type(entries, tmp_path):
    dirs, _ = entries
    source = checkpoint_blocks.load(dirs["rewrite"])
    source.refused["output.chunks.0.weight"] = "F16"
    del source.blocks["output.chunks.0.weight"]
    model = io.load_model(dirs["rewrite"])
    with pytest.raises(UserError) as err:
        quantize.quantize(model, quantize.resolve({"linear": "c4w", "overrides": {"output": "source"}}), source)
    assert str(err.value).startswith("quantize.linear=source: layer output.chunks.0 is F16 in the GGUF")


# --- export ---------------------------------------------------------------------------------------

def core_ml_weights(pte):
    """[(data, scale, offset or None)] of every constexpr_blockwise_shift_scale in the Core ML
    program(s) inside ``pte``, as numpy arrays."""
    import tempfile
    from pathlib import Path

    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_mil
    from executorch.examples.apple.coreml.scripts.extract_coreml_models import extract_coreml_models

    out = []
    with tempfile.TemporaryDirectory() as folder:
        for package in extract_coreml_models(Path(pte).read_bytes(), folder):
            model_file = next(package.rglob("*.mlmodel"))
            spec = ct.utils.load_spec(str(model_file))
            weights = next(package.rglob("weights"), None)
            program = load_mil(spec, spec.specificationVersion, str(weights) if weights else None)
            for function in program.functions.values():
                for op in function.find_ops(op_type="constexpr_blockwise_shift_scale"):
                    offset = op.offset.val if op.offset is not None else None
                    out.append((np.asarray(op.data.val), np.asarray(op.scale.val), offset))
    return out


def test_core_ml_holds_the_gguf_blocks(entries):
    dirs, written = entries
    source = checkpoint_blocks.load(dirs["rewrite"])
    found = {}
    for data, scale, offset in core_ml_weights(dirs["export"] / export.MODEL_FILE):
        name = next(n for n, b in source.blocks.items()
                    if tuple(b.qdata.shape) == data.shape and np.array_equal(b.qdata.numpy(), data.astype(np.int8)))
        found[name] = True
        blocks = source.blocks[name]
        assert scale.dtype == np.float16 and np.array_equal(scale.astype(np.float32), blocks.scale.numpy())
        zero = np.zeros(scale.shape) if offset is None else offset.astype(np.float64)
        weight = (data.astype(np.float64).reshape(*scale.shape, -1) - zero[..., None]) * scale.astype(np.float64)[..., None]
        canonical_name, rows = chunk_rows(name.removesuffix(".weight"), data.shape[0])
        reference = written[canonical_name][rows].double()
        error = (torch.from_numpy(weight.reshape(data.shape)) - reference).abs()
        assert (error <= allowed(blocks, reference)).all(), name
    assert sorted(found) == sorted(source.blocks)  # every linear, each from its own blocks


def test_the_twin_computes_the_eager_quantized_model(entries):
    from executorch.runtime import Runtime

    dirs, _ = entries
    spec = io.read_spec(dirs["export"])
    dtype = DTYPES[spec["ane"]["dtype"]]
    exact = float_bounds.REFERENCE_DTYPES[dtype]
    eager = quantize.quantized_model(dirs["rewrite"], SOURCE)
    reference_model = io.load_model(dirs["rewrite"]).to(exact)
    reference_model.load_state_dict({f"{n}.weight": m.weight.dequantize() for n, m in eager.named_modules()
                                     if parametrize.is_parametrized(m, "weight")}, strict=False)
    twin = Runtime.get().load_program(dirs["export"] / export.TWIN_FILE).load_method("forward")
    inputs = later_call_inputs(spec, spec["ane"]["seq_length"])
    want = eager(*inputs)[0]
    got = twin.execute(io.flat_inputs(inputs))[0]
    reference = reference_model(*float_bounds.cast_floats(inputs, exact))[0]
    bound = float_bounds.allowed_distance(float_bounds.distance(want, reference), reference, dtype,
                                          float_bounds.longest_reduction(spec))
    assert float_bounds.distance(got, reference) <= bound


def test_export_needs_core_ml_to_take_every_op(entries):
    dirs, _ = entries
    report = json.loads((dirs["export"] / "delegation.json").read_text())
    assert report["delegated_share"] == 1.0 and report["cpu_ops"] == {}


# --- the recipe -----------------------------------------------------------------------------------

@pytest.mark.parametrize("compute_unit, warned", [("CPU_AND_NE", True), ("ALL", False)])
def test_a_neural_engine_recipe_with_source_blocks_is_warned_once(write, caplog, compute_unit, warned):
    path = write("recipes/tiny/mac.yaml", f"source: {{path: m.gguf}}\nquantize: {{linear: source}}\n"
                                          f"export: {{compute_unit: {compute_unit}}}\n")
    with caplog.at_level(logging.WARNING, logger="ane_build.recipe"):
        recipe.load(path, path.parent.parent)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == int(warned)
    if warned:
        assert messages[0].startswith("recipe tiny/mac (") and "Neural Engine" in messages[0]
        assert "GPU/CPU" in messages[0]
