import pytest
import torch
from torch.utils import _pytree as pytree

from ane_build.model import io
from ane_build.stages import quantize
from ane_build.util.errors import UserError
from tests.stages.tiny_entries import TOKENIZER, ane, build, later_call_inputs
from tests.tiny_llama import tiny_params


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    """A tiny rewrite entry with a decode method."""
    return build(tmp_path_factory.mktemp("q"), "rewrite", ane(decode_method=True))[0]["rewrite"]


def run(rewrite_entry, tmp_path, params):
    out = tmp_path / "quantize"
    out.mkdir(parents=True)
    quantize.run({"rewrite": rewrite_entry}, params, out)
    return out


def test_one_program_per_method_computing_the_quantized_model(rewritten, tmp_path):
    import torchao.quantization.quant_primitives  # noqa: F401  (registers the op the programs call)

    params = {"linear": "c4w", "embedding": "8,0"}
    entry = run(rewritten, tmp_path, params)
    spec = io.read_spec(entry)
    assert spec["programs"] == {"forward": {"file": "forward.pt2", "seq_length": 1},
                                "prefill": {"file": "prefill.pt2", "seq_length": 8}}
    assert (entry / TOKENIZER[0]).read_bytes() == TOKENIZER[1]

    eager = quantize.quantized_model(rewritten, params)
    for method, p in spec["programs"].items():
        program = torch.export.load(entry / p["file"])
        inputs = later_call_inputs(spec, p["seq_length"], method=method)
        got, want = program.module()(*inputs), eager(*inputs)
        for g, w in zip(pytree.tree_leaves(got), pytree.tree_leaves(want)):
            assert g.shape == w.shape and torch.equal(g, w), method


def test_the_programs_are_the_same_exported_beside_or_one_after_the_other(rewritten, tmp_path, monkeypatch):
    """ANE_BUILD_JOBS=2 exports prefill in a forked copy of the process; 1, after forward, in it."""
    entries = {}
    for jobs in ("2", "1"):
        monkeypatch.setenv("ANE_BUILD_JOBS", jobs)
        entries[jobs] = run(rewritten, tmp_path / jobs, {"linear": "c8w", "embedding": "8,0"})
    for name in ("forward.pt2", "prefill.pt2", "spec.json"):
        assert (entries["2"] / name).read_bytes() == (entries["1"] / name).read_bytes(), name


def test_ideal_size_counts_each_weight_at_its_bits(rewritten, tmp_path):
    p = tiny_params()
    linear = p["n_layers"] * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128) + 320 * 64
    embedding, norms = 320 * 64, (2 * p["n_layers"] + 1) * 64
    spec = io.read_spec(run(rewritten, tmp_path, {"linear": "b4w", "group_size": 32, "embedding": "4,32"}))
    assert spec["quantize"]["weight_groups"] == {"linear:b4w": {"params": linear, "bits": 4},
                                                 "embedding": {"params": embedding, "bits": 4},
                                                 "other": {"params": norms, "bits": 16}}
    assert spec["quantize"]["ideal_bytes"] == linear // 2 + embedding // 2 + norms * 2


def test_overrides_give_the_lm_head_its_own_kind(rewritten, tmp_path):
    params = {"linear": "c4w", "overrides": {"output": "c8w", "layers.1.*": "none"}}
    model = quantize.quantized_model(rewritten, params)
    bits = {name: quantize.linear_kind(quantize.resolve(params), name) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}
    assert {bits[n] for n in bits if n.startswith("output.")} == {"c8w"}  # every chunk of the split LM head
    assert {bits[n] for n in bits if n.startswith("layers.1.")} == {"none"}
    assert {bits[n] for n in bits if n.startswith("layers.0.")} == {"c4w"}
    spec = io.read_spec(run(rewritten, tmp_path, params))
    groups = spec["quantize"]["weight_groups"]
    assert (groups["linear:c8w"]["params"], groups["linear:c8w"]["bits"]) == (320 * 64, 8)
    assert groups["linear:none"]["bits"] == 16 and groups["linear:c4w"]["bits"] == 4


def quantization_error(rewritten, params):
    """Squared error of layer 0's w2 after quantization, and the quantized weight."""
    model = quantize.io.load_model(rewritten)
    weight = model.layers[0].feed_forward.w2.weight.float().clone()
    quantize._quantize(model, quantize.resolve(params), None, {})
    got = model.layers[0].feed_forward.w2.weight
    return (got.dequantize().float() - weight).pow(2).sum().item(), got


@pytest.mark.parametrize("linear", ["c4w", "b4w", "c8w"])
def test_asymmetric_mapping_adds_zero_points_and_fits_closer(rewritten, linear):
    symmetric_error, symmetric = quantization_error(rewritten, {"linear": linear, "mapping": "symmetric"})
    asymmetric_error, asymmetric = quantization_error(rewritten, {"linear": linear, "mapping": "asymmetric"})
    assert not symmetric.zero_point.any() and asymmetric.zero_point.any()
    assert asymmetric_error < symmetric_error


def test_eight_bits_per_channel_fit_sixteen_times_closer_than_four(rewritten):
    error4, _ = quantization_error(rewritten, {"linear": "c4w"})
    error8, weight = quantization_error(rewritten, {"linear": "c8w"})
    assert weight.qdata.min() < -8 or weight.qdata.max() > 7  # the int8 range is used
    # Each extra bit halves the step, so the squared rounding error falls by about 4**4.
    assert error8 < error4 / 64


def test_palettes_export_as_codebook_lookups_of_their_bits(rewritten, tmp_path):
    params = {"linear": "lut6", "palette_group": 16, "overrides": {"output": "c8w"}}
    entry = run(rewritten, tmp_path, params)
    spec = io.read_spec(entry)
    groups = spec["quantize"]["weight_groups"]
    assert groups["linear:lut6"]["bits"] == 6 and groups["linear:c8w"]["bits"] == 8
    program = quantize.saved_programs.load(entry / "forward.pt2")
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    linears = [n for n, m in quantize.io.load_model(rewritten).named_modules() if isinstance(m, torch.nn.Linear)]
    palettized = [n for n in linears if not n.startswith("output.")]  # every split chunk but the head's
    assert targets.count("quant.dequantize_codebook.default") == len(palettized) > 7
    model = quantize.quantized_model(rewritten, params)
    weight = dict(model.named_modules())[palettized[0]].weight.dequantize()
    for rows in weight.reshape(-1, 16, weight.shape[1]):  # one palette of at most 64 values per 16 rows
        assert rows.unique().numel() <= 64


def test_hqq_scales_fit_closer_than_minmax(rewritten):
    minmax, _ = quantization_error(rewritten, {"linear": "c4w"})
    hqq, _ = quantization_error(rewritten, {"linear": "c4w", "scales": "hqq"})
    assert hqq < minmax


@pytest.mark.parametrize("params, expected", [
    ({"linear": "b4w", "group_size": 48},
     ["quantize.group_size=48", "in_features=64", "layers.0.attention.wq"]),
    ({"linear": "c5w"}, ["quantize.linear='c5w'"]),
    ({"mapping": "affine"}, ["quantize.mapping='affine'", "symmetric, asymmetric"]),
    ({"embedding": "4"}, ["quantize.embedding='4'"]),
    ({"scales": "hqq", "mapping": "asymmetric"}, ["quantize.scales=hqq", "mapping=symmetric"]),
    ({"scales": "mse"}, ["quantize.scales='mse'", "minmax, hqq"]),
    ({"overrides": {"output": "c6w"}}, ["quantize.overrides.output='c6w'"]),
    ({"linear": "lut4", "palette_group": 48}, ["quantize.palette_group=48", "64 output channels"]),
    ({"overrides": ["output"]}, ["quantize.overrides=['output']"]),
    ({"embedding": "3,32"}, ["quantize.embedding='3,32'"]),
    ({"embedding": "4,x"}, ["quantize.embedding='4,x'"]),
    ({"embedding": "4,48"}, ["quantize.embedding", "48", "width 64"]),
    ({"fit": "awq"}, ["quantize.fit='awq'", "data-free, fisher, gptq"]),
    ({"candidates": ["c8w", "b4w"]}, ["quantize.candidates='b4w'", "c4w, c8w, lut4, lut6"]),
    # Without the calibrate entry the pipeline plans for them (a run by hand, a library caller).
    ({"linear": "c8w", "fit": "gptq"}, ["quantize.fit: gptq reads the calibrate stage's statistics"]),
    ({"budget_mb": 1}, ["quantize.budget_mb: 1 reads the calibrate stage's statistics"]),
])
def test_bad_settings_are_one_line_naming_the_key(rewritten, tmp_path, params, expected):
    with pytest.raises(UserError) as err:
        run(rewritten, tmp_path, params)
    message = str(err.value)
    assert all(part in message for part in expected), message
    assert "\n" not in message
    assert not any((tmp_path / "quantize").iterdir())


@pytest.fixture(scope="module")
def calibrated_entry(tmp_path_factory):
    """A calibrate entry of the tiny checkpoint the rewrite entry was made from (the same weights)."""
    from ane_build.stages import calibrate
    from tests.stages.tiny_export import convert_entry
    from tests.tiny_llama import tiny_weights

    root = tmp_path_factory.mktemp("calibrated")
    converted = convert_entry(root / "convert", tiny_weights(tiny_params()))
    (root / "calibrate").mkdir()
    calibrate.run({"convert": converted}, {"text": None, "windows": 2, "window_tokens": 16}, root / "calibrate")
    return root / "calibrate"


def run_calibrated(rewritten, calibrated_entry, tmp_path, params):
    out = tmp_path / "quantize"
    out.mkdir(parents=True)
    quantize.run({"rewrite": rewritten, "calibrate": calibrated_entry}, params, out)
    return out


def test_a_budget_mixes_kinds_to_fit_and_says_what_each_linear_got(rewritten, calibrated_entry, tmp_path):
    import json

    everything_c8w = io.read_spec(run(rewritten, tmp_path / "c8w", {"linear": "c8w"}))["quantize"]["ideal_bytes"]
    budget = 0.8 * everything_c8w / 1e6
    params = {"linear": "c8w", "fit": "fisher", "budget_mb": budget, "candidates": ["c8w", "lut4"],
              "palette_group": 4, "overrides": {"output": "c8w"}}
    entry = run_calibrated(rewritten, calibrated_entry, tmp_path / "mixed", params)
    allocation = json.loads((entry / quantize.ALLOCATION_FILE).read_text())
    assert allocation["weights_mb"] <= budget and allocation["kinds"]["c8w"] and allocation["kinds"]["lut4"]
    assert not any(name.startswith("output") for name in allocation["layers"])  # an override stays as it is
    spec = io.read_spec(entry)
    assert spec["quantize"]["allocated"] == {name: layer["kind"] for name, layer in allocation["layers"].items()}
    program = quantize.saved_programs.load(entry / "forward.pt2")
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("quant.dequantize_codebook.default") == allocation["kinds"]["lut4"]
    # The most sensitive linears by the estimate keep 8 bits: each got the option the trade favoured.
    eight = [layer["lut4"]["estimated_kld"] / (layer["c8w"]["bytes"] - layer["lut4"]["bytes"])
             for layer in allocation["layers"].values() if layer["kind"] == "c8w"]
    four = [layer["lut4"]["estimated_kld"] / (layer["c8w"]["bytes"] - layer["lut4"]["bytes"])
            for layer in allocation["layers"].values() if layer["kind"] == "lut4"]
    assert min(eight) >= max(four)


def test_gptq_codes_export_and_follow_the_layers_outputs_closer(rewritten, calibrated_entry, tmp_path):
    from ane_build.quant import calibration

    stats = calibration.load(calibrated_entry / calibration.FILE)
    xtx = stats["layers.0.feed_forward.w2"]["xtx"].double()
    weight = io.load_model(rewritten).layers[0].feed_forward.w2.weight.double()
    error = {}
    for fit in ("data-free", "gptq"):
        params = {"linear": "c4w", "fit": fit}
        entry = run_calibrated(rewritten, calibrated_entry, tmp_path / fit, params) if fit == "gptq" else \
            run(rewritten, tmp_path / fit, params)
        program = quantize.saved_programs.load(entry / "forward.pt2")
        assert any(str(n.target) == "torchao.dequantize_affine.default" for n in program.graph.nodes)
        model = quantize.io.load_model(rewritten)
        settings = quantize.resolve(params)
        stats_or_none = stats if fit == "gptq" else None
        fitted, _ = quantize.fit_linears(model, settings, stats_or_none, "fp16")
        quantize._quantize(model, settings, None, fitted)
        delta = model.layers[0].feed_forward.w2.weight.dequantize().double() - weight
        error[fit] = float(torch.einsum("oi,ij,oj->", delta, xtx, delta))
    assert error["gptq"] < error["data-free"]


def test_a_budget_below_the_smallest_kinds_is_one_line_and_writes_nothing(rewritten, calibrated_entry, tmp_path):
    with pytest.raises(UserError, match=r"^quantize.budget_mb=0.001: the weights take at least [0-9.]+ MB with the "
                                        r"smallest of c8w, lut6, lut4 in every linear$"):
        run_calibrated(rewritten, calibrated_entry, tmp_path, {"linear": "c8w", "budget_mb": 0.001,
                                                               "palette_group": 4})
    assert not any((tmp_path / "quantize").iterdir())


def test_the_fits_are_the_same_beside_or_in_this_process(rewritten, calibrated_entry, tmp_path, monkeypatch):
    """ANE_BUILD_JOBS=2 fits every other linear in a forked copy of the process: the same codes either way."""
    entries = {}
    for jobs in ("2", "1"):
        monkeypatch.setenv("ANE_BUILD_JOBS", jobs)
        entries[jobs] = run_calibrated(rewritten, calibrated_entry, tmp_path / jobs,
                                       {"linear": "c8w", "fit": "gptq", "budget_mb": 0.15, "palette_group": 4})
    for name in ("forward.pt2", "spec.json", quantize.ALLOCATION_FILE):
        assert (entries["2"] / name).read_bytes() == (entries["1"] / name).read_bytes(), name
