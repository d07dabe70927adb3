import json

import numpy as np
import pytest
from torch.utils import _pytree as pytree

from ane_build.model import io
from ane_build.programs import payload_split
from ane_build.programs.coreml_methods import CoreMLMethods
from ane_build.stages import export
from ane_build.util.errors import UserError
from tests.stages.tiny_entries import ane, build, later_call_inputs
from tests.tiny_llama import WIDE

# WIDE at 8 bits: a 2.1 MB fp16 embedding table, ~1 MB of weights a layer, a 1 MB LM head.
LIMIT_MB = 2.6
BUILD = {"ane_params": ane(decode_method=True, target_split_size=512), "quantize_params": {"linear": "c8w"},
         "model_params": WIDE}


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    """{"whole": export entry, "cut": the same quantize entry exported under LIMIT_MB}, and its metrics."""
    entries, _ = build(tmp_path_factory.mktemp("whole"), "export", **BUILD)
    cut = tmp_path_factory.mktemp("cut")
    metrics = export.run({"quantize": entries["quantize"]}, {"max_payload_mb": LIMIT_MB}, cut)
    return {"whole": entries["export"], "cut": cut, "quantize": entries["quantize"]}, metrics


def test_a_program_over_the_limit_is_cut_into_payloads_under_it(programs):
    entries, metrics = programs
    assert len(metrics["payload_mb"]) == 3 and max(metrics["payload_mb"]) <= LIMIT_MB
    report = json.loads((entries["cut"] / "delegation.json").read_text())
    # Every method cut at the same layers: partition i of each is one multifunction payload.
    assert {m: r["partitions"] for m, r in report["methods"].items()} == {"forward": 3, "prefill": 3}
    assert report["cpu_ops"] == {}
    lint = json.loads((entries["cut"] / "lint.json").read_text())
    assert [set(m["functions"]) for m in lint["models"]] == [{"forward", "prefill"}] * 3
    # The mask handed from the first payload to the others is the convention's mask still.
    assert lint["clean"] and lint["findings"] == 0


@pytest.mark.parametrize(("method", "seq_length"), [("prefill", 8), ("forward", 1)])
def test_the_cut_program_computes_what_the_whole_one_does(programs, method, seq_length):
    entries, _ = programs
    spec = io.read_spec(entries["whole"])
    inputs = [t.numpy() for t in pytree.tree_leaves(later_call_inputs(spec, seq_length, method=method))]
    whole, cut = (CoreMLMethods(entries[name] / export.MODEL_FILE).run(method, inputs) for name in ("whole", "cut"))
    # The same ops, each output rounded to the dtype the program declares, in the same interpreter: a
    # cut only hands values from one payload to the next as the fp16 tensors they already were.
    assert len(whole) == len(cut) and all(np.array_equal(a, b) for a, b in zip(whole, cut))


def interface(path, methods):
    """{method: what a runner reads of it} of a .pte, as ExecuTorch's runtime reads them: its inputs'
    and outputs' TensorInfo for ``methods`` (Linux can read a Core ML method, not run it), the values
    of the others (the runner's metadata)."""
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    seen = {}
    for name in program.method_names:
        if name in methods:
            meta = program.metadata(name)
            seen[name] = ([str(meta.input_tensor_meta(i)) for i in range(meta.num_inputs())],
                          [str(meta.output_tensor_meta(i)) for i in range(meta.num_outputs())])
        else:
            seen[name] = [v.tolist() if hasattr(v, "tolist") else v for v in program.load_method(name).execute([])]
    return seen


def test_a_runner_sees_the_cut_program_as_the_whole_one(programs):
    entries, _ = programs
    whole, cut = (interface(entries[name] / export.MODEL_FILE, ("forward", "prefill")) for name in ("whole", "cut"))
    assert {"forward", "prefill", "n_layers", "cache_size"} <= set(whole) and cut == whole


def test_weights_over_the_limit_between_two_layers_are_one_line_naming_the_setting(programs, tmp_path):
    entries, _ = programs
    with pytest.raises(UserError) as e:
        export.run({"quantize": entries["quantize"]}, {"max_payload_mb": 1.5}, tmp_path)
    assert str(e.value) == ("export.max_payload_mb: 1.5 MB: what precedes the first layer alone reads 2.1 MB of "
                            "weights; raise it, or quantize to fewer bits")


def test_a_payload_over_the_limit_once_written_is_one_line(programs):
    entries, _ = programs
    with pytest.raises(UserError) as e:
        export.payload_sizes(entries["whole"] / export.MODEL_FILE, 2)
    assert str(e.value) == "export.max_payload_mb: 2: Core ML payload 1 of model.pte takes 5.3 MB"


def test_units_are_cut_into_the_fewest_payloads_as_even_as_they_go():
    sizes = {name: 1 for name in "abcdef"}
    reads = [{c} for c in "abcdef"]
    # Filling payloads in turn gives 5 + 1; as even as two payloads go: 3 + 3.
    assert payload_split.even_cuts(reads, sizes, 5) == [0, 0, 0, 1, 1, 1]
    assert payload_split.even_cuts(reads, sizes, 6) == [0] * 6
    assert payload_split.even_cuts(reads, sizes, 1) == [0, 1, 2, 3, 4, 5]


def test_a_weight_two_units_read_counts_once_in_their_payload():
    sizes = {"shared": 3, "a": 1, "b": 1}
    assert payload_split.even_cuts([{"shared", "a"}, {"shared", "b"}], sizes, 5) == [0, 0]
    assert payload_split.even_cuts([{"shared", "a"}, {"shared", "b"}], sizes, 4) == [0, 1]


@pytest.mark.parametrize(("unit", "name"), [(0, "what precedes the first layer"), (2, "layer 1"), (4, "the LM head")])
def test_a_unit_over_the_limit_is_named(unit, name):
    reads = [{i} for i in range(5)]
    sizes = {i: 3_000_000 if i == unit else 1 for i in range(5)}
    with pytest.raises(UserError, match=f"^export.max_payload_mb: 2 MB: {name} alone reads 3.0 MB of weights"):
        payload_split.even_cuts(reads, sizes, 2_000_000)
