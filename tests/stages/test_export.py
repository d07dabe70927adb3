import json
import shutil

import pytest
import torch
from torch.nn.utils import parametrize

from ane_build.model import io
from ane_build.model.ane_llama import rope_table
from ane_build.model.rewrites import DTYPES
from ane_build.stages import export, quantize
from ane_build.util.errors import UserError
from tests import float_bounds
from tests.stages.tiny_entries import ane, build, later_call_inputs
from tests.tiny_llama import WIDE

QUANTIZATIONS = {"none": {"linear": "none"}, "c4w": {"linear": "c4w"}, "b4w": {"linear": "b4w", "group_size": 32},
                 "c4w+emb4,32": {"linear": "c4w", "embedding": "4,32"}}
# Every {dtype} x {linear quantization, + embedding} x {cache layout} combination of the issue.
MATRIX = {
    f"{dtype}-{quant}-{'list' if cache_list else 'tensor'}": {
        "ane_params": ane(dtype=dtype, use_cache_list=cache_list), "quantize_params": QUANTIZATIONS[quant]}
    for dtype in ("fp16", "fp32") for quant in QUANTIZATIONS for cache_list in (True, False)
}
BUILDS = {
    **MATRIX,
    "fp16-c4w-list-decode": {"ane_params": ane(target_split_size=512, decode_method=True),
                             "model_params": WIDE},
    "fp16-c4w-asym-list": {"quantize_params": {"linear": "c4w", "mapping": "asymmetric"}},
    # The build above without its decode method: what a second method costs.
    "fp16-c4w-list-wide": {"ane_params": ane(target_split_size=512), "model_params": WIDE},
}
DELEGATED = [*MATRIX, "fp16-c4w-list-decode", "fp16-c4w-asym-list"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """builds(name) -> (entries, metrics); each build runs once per module, when first asked for."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = build(tmp_path_factory.mktemp(name), "export", **BUILDS[name])
        return done[name]
    return get


def load(path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(path)


@pytest.mark.parametrize("name", DELEGATED)
def test_core_ml_takes_every_op(builds, name):
    entries, metrics = builds(name)
    report = json.loads((entries["export"] / "delegation.json").read_text())
    methods = io.methods(io.read_spec(entries["export"])["ane"])
    assert report["delegated_share"] == 1.0 and report["cpu_ops"] == {}
    assert {m: r["partitions"] for m, r in report["methods"].items()} == dict.fromkeys(methods, 1)
    assert "100.0% of ops delegated" in (entries["export"] / "delegation.txt").read_text()
    assert metrics["export"]["pte_bytes"] == (entries["export"] / export.MODEL_FILE).stat().st_size


def exact_model(rewrite_entry, eager, dtype):
    """``eager``'s weights as it dequantizes them, in a model computing in the wider float ``dtype``
    (tests/float_bounds.py): exact arithmetic on the weights the twin holds."""
    model = io.load_model(rewrite_entry).to(dtype)
    weights = {f"{name}.weight": module.weight.dequantize() for name, module in eager.named_modules()
               if parametrize.is_parametrized(module, "weight")}
    assert not model.load_state_dict(weights, strict=False).unexpected_keys
    return model


def twin_distances(entries, twin_file, quantize_params):
    """{method: (the twin's logits' distance from exact arithmetic, the most a correct twin's may be)}.

    The bound comes from the eager quantized model's own distance on the same inputs, so it holds
    whichever kernels this CPU gives XNNPACK (tests/float_bounds.py says why).
    """
    spec = io.read_spec(entries["export"])
    dtype = DTYPES[spec["ane"]["dtype"]]
    exact_dtype = float_bounds.REFERENCE_DTYPES[dtype]
    eager = quantize.quantized_model(entries["rewrite"], quantize_params)
    reference_model = exact_model(entries["rewrite"], eager, exact_dtype)
    twin = load(twin_file)
    out = {}
    for method, seq_length in io.methods(spec["ane"]).items():
        inputs = later_call_inputs(spec, seq_length, method=method)
        want = eager(*inputs)
        got = twin.load_method(method).execute(io.flat_inputs(inputs))
        assert len(got) == len(io.flat_inputs(want))
        reference = reference_model(*float_bounds.cast_floats(inputs, exact_dtype))[0]
        allowed = float_bounds.allowed_distance(float_bounds.distance(want[0], reference), reference, dtype,
                                                float_bounds.longest_reduction(spec))
        out[method] = float_bounds.distance(got[0], reference), allowed
    return out


@pytest.mark.parametrize("name", DELEGATED)
def test_twin_matches_the_eager_quantized_model(builds, name):
    entries, _ = builds(name)
    quantize_params = BUILDS[name].get("quantize_params", {"linear": "c4w"})
    for method, (distance, allowed) in twin_distances(entries, entries["export"] / export.TWIN_FILE,
                                                      quantize_params).items():
        assert distance <= allowed, method


@pytest.fixture
def wrong_twin(builds, tmp_path):
    """The twin of fp16-c4w-list lowered from its rewrite entry with float_bounds.WRONG_WEIGHT's
    rows reversed. Only the twin: Core ML is not compared here."""
    from safetensors.torch import load_file, save_file

    entries, _ = builds("fp16-c4w-list")
    rewrite = shutil.copytree(entries["rewrite"], tmp_path / "rewrite")
    state = load_file(str(rewrite / io.STATE_FILE))
    wrong = float_bounds.WRONG_WEIGHT
    state[wrong] = state[wrong].flip(0).contiguous()
    save_file(state, str(rewrite / io.STATE_FILE))
    (tmp_path / "quantize").mkdir()
    quantize.run({"rewrite": rewrite}, {"linear": "c4w"}, tmp_path / "quantize")
    export.write_twin(tmp_path / "quantize", tmp_path / export.TWIN_FILE)
    return tmp_path / export.TWIN_FILE


def test_a_twin_lowered_from_a_wrong_weight_is_caught(builds, wrong_twin):
    entries, _ = builds("fp16-c4w-list")
    for method, (distance, allowed) in twin_distances(entries, wrong_twin, {"linear": "c4w"}).items():
        assert distance > allowed, method


def test_runner_metadata_is_in_both_programs(builds):
    entries, _ = builds("fp16-c4w-list-decode")
    # cache_size: max_seq_length - 1, the default with a decode method.
    expected = {"seq_length": 8, "max_seq_length": 32, "cache_size": 31, "n_layers": 2, "n_kv_heads": 2,
                "head_dim": 64, "dtype": "fp16", "vocab_size": 4096, "bos_id": 1, "eos_ids": [2, 3],
                "use_cache_list": True}
    spec = io.read_spec(entries["export"])
    cos, sin = rope_table(spec["params"], 32, torch.float16)
    assert cos.shape == (32, 32)
    for file in (export.MODEL_FILE, export.TWIN_FILE):
        program = load(entries["export"] / file)
        assert program.method_names == {"forward", "prefill", "freqs_cos", "freqs_sin", *expected}
        got = {name: program.load_method(name).execute([]) for name in expected}
        # ExecuTorch returns a list from every method; a list constant comes back as it is.
        assert got == {name: v if isinstance(v, list) else [v] for name, v in expected.items()}
        # The rotary table a runner slices each call's rows from, to the bit.
        assert torch.equal(program.load_method("freqs_cos").execute([])[0], cos)
        assert torch.equal(program.load_method("freqs_sin").execute([])[0], sin)
    # What upstream's runners build their ModelArgs from, beside the programs.
    assert json.loads((entries["export"] / io.PARAMS_FILE).read_text()) == spec["params"] == WIDE


def test_a_second_method_shares_the_weights(builds):
    two, one = builds("fp16-c4w-list-decode")[1]["export"], builds("fp16-c4w-list-wide")[1]["export"]
    assert two["pte_bytes"] < 1.05 * one["pte_bytes"]
    # And the weights are most of the file, so storing them twice could not pass unseen.
    assert one["ideal_bytes"] > 0.6 * one["pte_bytes"]


def test_fp16_and_4bit_weights_need_ios18(builds, tmp_path):
    entries, _ = builds("fp16-c4w-list-decode")
    with pytest.raises(UserError) as err:
        export.run({"quantize": entries["quantize"]}, {"minimum_deployment_target": "iOS17"}, tmp_path)
    message = str(err.value)
    assert message.startswith("export.minimum_deployment_target=iOS17: ") and "\n" not in message
    assert "ane.dtype=fp16" in message and "quantize.linear=c4w" in message


class XorModel(torch.nn.Module):
    """bitwise_xor has no Core ML conversion: it stays on the CPU."""

    def forward(self, x):
        return torch.bitwise_xor(x.int(), 3).float() + x


@pytest.fixture
def xor_entry(builds, tmp_path):
    """A quantize entry whose forward program holds an op Core ML does not take."""
    entries, _ = builds("fp16-c4w+emb4,32-list")
    spec = io.read_spec(entries["quantize"])
    entry = tmp_path / "quantize"
    entry.mkdir()
    torch.export.save(torch.export.export(XorModel(), (torch.randn(4),), strict=False), entry / "forward.pt2")
    (entry / spec["tokenizer"]).write_bytes((entries["quantize"] / spec["tokenizer"]).read_bytes())
    io.write_spec(spec, entry)
    return entry


def test_ops_left_on_the_cpu_are_reported(xor_entry, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    metrics = export.run({"quantize": xor_entry}, {"require_full_delegation": False}, out)
    report = json.loads((out / "delegation.json").read_text())
    assert report["cpu_ops"] == {"aten.bitwise_xor.Scalar": 1} and metrics["cpu_ops"] == 1
    assert "aten.bitwise_xor.Scalar" in (out / "delegation.txt").read_text()


def test_full_delegation_refuses_ops_left_on_the_cpu(xor_entry, tmp_path):
    with pytest.raises(UserError) as err:
        export.run({"quantize": xor_entry}, {"require_full_delegation": True}, tmp_path)
    message = str(err.value)
    assert message.startswith("export.require_full_delegation: ") and "aten.bitwise_xor.Scalar x1" in message
    assert "\n" not in message


def test_one_lowering_at_a_time_writes_the_same_files(xor_entry, tmp_path, monkeypatch):
    """ANE_BUILD_JOBS=1: the twin lowered after Core ML in this process, the same files out."""
    written = {}
    for jobs in ("2", "1"):
        monkeypatch.setenv("ANE_BUILD_JOBS", jobs)
        out = tmp_path / jobs
        out.mkdir()
        export.run({"quantize": xor_entry}, {"require_full_delegation": False}, out)
        written[jobs] = {name: (out / name).read_bytes() for name in (export.TWIN_FILE, "delegation.json")}
    assert written["1"] == written["2"]


@pytest.mark.parametrize("value", ["3", "many", ""])
def test_a_bad_jobs_setting_is_one_line_before_any_work(xor_entry, tmp_path, monkeypatch, value):
    monkeypatch.setenv("ANE_BUILD_JOBS", value)
    out = tmp_path / "export"
    out.mkdir()
    with pytest.raises(UserError) as err:
        export.run({"quantize": xor_entry}, {"require_full_delegation": False}, out)
    assert str(err.value).startswith("ANE_BUILD_JOBS: expected 1 ") and str(err.value).endswith(f"got {value!r}")
    assert list(out.iterdir()) == []


def test_the_delegation_report_lists_methods_in_one_order_whatever_the_managers():
    """ExecuTorch keeps a program's methods in a set, whose order changes with each process's string
    hashing: the report (a release file) must not."""
    program = torch.export.export(torch.nn.Linear(4, 4), (torch.randn(1, 4),))

    class Manager:
        methods = ["forward", "decode", "prefill"]

        def exported_program(self, method):
            return program

    assert list(export.delegation_report(Manager())["methods"]) == ["decode", "forward", "prefill"]
