"""cost on the tiny model, each count checked against what the eager program does and holds."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ane_build.analysis import cost
from ane_build.model import io
from tests.stages.tiny_entries import ane, build


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A c8w quantize entry of the tiny model with a decode method: (spec, entry)."""
    entries, _ = build(tmp_path_factory.mktemp("cost"), "quantize", ane_params=ane(decode_method=True),
                       quantize_params={"linear": "c8w", "embedding": "8,0"})
    return io.read_spec(entries["quantize"]), entries["rewrite"]


def test_macs_are_the_matmuls_the_eager_program_runs(quantized):
    spec, rewrite = quantized
    model = io.load_model(rewrite)
    for method, seq_length in io.methods(spec["ane"]).items():
        with FlopCounterMode(display=False) as flops:
            model(*io.example_inputs(spec, method, seq_length))
        assert cost.method_cost(spec, seq_length)["macs_per_call"] * 2 == flops.get_total_flops(), method


def test_kv_bytes_are_the_caches_read_and_the_slots_written(quantized):
    spec, rewrite = quantized
    model = io.load_model(rewrite).to(torch.float16)
    for method, seq_length in io.methods(spec["ane"]).items():
        inputs = io.example_inputs(spec, method, seq_length)
        _, new_k, new_v = model(*inputs)
        counts = cost.method_cost(spec, seq_length)
        assert counts["kv_bytes_read_per_call"] == sum(t.nbytes for t in [*inputs[4], *inputs[5]])
        assert counts["kv_bytes_written_per_call"] == sum(t.nbytes for t in [*new_k, *new_v])


def test_weight_bytes_are_every_quantized_weight_but_the_unread_embedding_rows(quantized):
    spec, rewrite = quantized
    params, groups = spec["params"], spec["quantize"]["weight_groups"]
    everything = sum(g["params"] * g["bits"] // 8 for g in groups.values())
    table = params["vocab_size"] * params["dim"]  # 8 bits a weight
    assert groups["embedding"]["params"] == table
    for seq_length in io.methods(spec["ane"]).values():
        read = cost.method_cost(spec, seq_length)["weight_bytes_per_call"]
        assert read == everything - table + seq_length * params["dim"]


def test_decoding_through_the_prefill_method_wastes_its_padding(quantized):
    spec, _ = quantized
    methods = cost.costs(spec)
    seq_length = spec["ane"]["seq_length"]
    assert methods["forward"]["padding_waste"] == 0
    assert (seq_length - 1) / seq_length * 0.9 < methods["prefill"]["padding_waste"] < (seq_length - 1) / seq_length


def test_the_bound_is_a_devices_bandwidth_over_the_cheapest_bytes_per_token(quantized):
    methods = cost.costs(quantized[0])
    bound = cost.decode_bound(methods, "iPad Pro (M4)")
    per_token = methods["forward"]["bytes_per_decoded_token"]
    assert bound["method"] == "forward" and per_token < methods["prefill"]["bytes_per_decoded_token"]
    assert bound["tokens_per_second_at_most"] == round(120e9 / per_token, 1)
    assert cost.decode_bound(methods, "a device nobody measured") is None
