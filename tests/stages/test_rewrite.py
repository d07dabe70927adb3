import json

import pytest
import torch

from ane_build.checkpoint import canonical
from ane_build.model import io
from ane_build.model.ane_llama import AneLlama, flat_logits
from ane_build.model.rewrites import DTYPES
from ane_build.stages import rewrite
from ane_build.util.errors import UserError
from tests import float_bounds
from tests.stages.tiny_entries import TOKENIZER, ane, convert_entry, later_call_inputs
from tests.tiny_llama import tiny_params, tiny_weights


def run(tmp_path, ane_params, convert=None):
    out = tmp_path / "rewrite"
    out.mkdir()
    rewrite.run({"convert": convert or convert_entry(tmp_path / "convert")}, ane_params, out)
    return out


@pytest.mark.parametrize("ane_params", [
    ane(),  # fp16, wide layers split
    ane(dtype="fp32", target_split_size=None, use_cache_list=False, cache_size=16),
], ids=["fp16-split", "fp32-whole"])
def test_entry_rebuilds_the_rewritten_model(tmp_path, ane_params):
    entry = run(tmp_path, ane_params)

    spec = io.read_spec(entry)
    assert spec["ane"]["cache_size"] == (ane_params["cache_size"] or 32 - 8)
    assert (spec["tokenizer"], spec["bos_id"], spec["eos_ids"]) == (TOKENIZER[0], 1, [2, 3])
    assert (entry / TOKENIZER[0]).read_bytes() == TOKENIZER[1]
    assert spec["params"] == tiny_params()

    model = io.load_model(entry)
    has_chunks = any(".chunks." in name for name in model.state_dict())
    assert has_chunks == (ane_params["target_split_size"] is not None)
    # The rewrites are exact in real arithmetic: a split cuts out_features, so every dot product
    # stays whole, and SafeRMSNorm is RMSNorm's function with one more rounding per element (x / m)
    # and two per row. So the rewritten model is as far from exact arithmetic as the plain one in
    # its dtype, give or take those roundings: twice as far leaves room for them, while a wrong
    # split moves the logits by their own size (~3).
    params, dtype = tiny_params(), DTYPES[ane_params["dtype"]]
    exact_dtype = float_bounds.REFERENCE_DTYPES[dtype]

    def plain(in_dtype):
        return AneLlama.from_weights(params, tiny_weights(params)).to(in_dtype)
    inputs = later_call_inputs(spec, ane_params["seq_length"])
    exact = plain(exact_dtype)(*float_bounds.cast_floats(inputs, exact_dtype))[0]
    plain_distance = float_bounds.distance(plain(dtype)(*inputs)[0], exact)
    allowed = 2 * plain_distance + float_bounds.rounding_floor(exact, dtype)
    assert float_bounds.distance(flat_logits(model(*inputs)[0]), exact) <= allowed


def test_split_size_that_does_not_divide_is_one_line_naming_the_key(tmp_path):
    # 320 // 96 = 3 chunks for the LM head, and 3 does not divide 320.
    with pytest.raises(UserError) as err:
        run(tmp_path, ane(target_split_size=96))
    assert "ane.target_split_size=96" in str(err.value) and "\n" not in str(err.value)
    assert not any((tmp_path / "rewrite").iterdir())


def test_bf16_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"ane\.dtype=bf16"):
        run(tmp_path, ane(dtype="bf16"))


def test_checkpoint_that_contradicts_its_params(tmp_path):
    convert = convert_entry(tmp_path / "convert")
    params = json.loads((convert / canonical.PARAMS_FILE).read_text())
    (convert / canonical.PARAMS_FILE).write_text(json.dumps({**params, "hidden_dim": 96}))
    with pytest.raises(UserError) as err:
        run(tmp_path, ane(), convert)
    message = str(err.value)
    assert canonical.WEIGHTS_FILE in message and "feed_forward.w1.weight" in message and "\n" not in message


def test_cache_that_does_not_fit_the_context(tmp_path):
    with pytest.raises(UserError) as err:
        run(tmp_path, ane(cache_size=32))
    assert str(err.value) == "ane.cache_size=32: expected 1 <= cache_size < max_seq_length = 32"


def test_cache_size_defaults_to_what_the_methods_leave(tmp_path):
    """max_seq_length - 1 with a decode method (prefill and decode share the caches), else room for a call."""
    spec = io.read_spec(run(tmp_path, ane(decode_method=True)))
    assert spec["ane"]["cache_size"] == 32 - 1
    assert rewrite.resolve(ane())["cache_size"] == 32 - 8


def test_fp16_state_is_stored_in_fp16(tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(run(tmp_path, ane()) / io.STATE_FILE))
    assert {t.dtype for t in state.values()} == {torch.float16}
