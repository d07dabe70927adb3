import json

import pytest
import torch
from torch.utils import _pytree as pytree

from ane_build.checkpoint import canonical
from ane_build.errors import UserError
from ane_build.model import io
from ane_build.model.ane_llama import AneLlama
from ane_build.stages import rewrite
from tests.stages.tiny_entries import TOKENIZER, ane, convert_entry, later_call_inputs
from tests.tiny_llama import tiny_params, tiny_weights


def run(tmp_path, ane_params, convert=None):
    out = tmp_path / "rewrite"
    out.mkdir()
    rewrite.run({"convert": convert or convert_entry(tmp_path / "convert")}, ane_params, out)
    return out


@pytest.mark.parametrize("ane_params, tolerance", [
    (ane(), 3e-2),  # fp16, wide layers split
    (ane(dtype="fp32", target_split_size=None, use_cache_list=False, cache_size=16), 1e-5),
], ids=["fp16-split", "fp32-whole"])
def test_entry_rebuilds_the_rewritten_model(tmp_path, ane_params, tolerance):
    entry = run(tmp_path, ane_params)

    spec = io.read_spec(entry)
    assert spec["ane"]["cache_size"] == (ane_params["cache_size"] or 32 - 8)
    assert (spec["tokenizer"], spec["bos_id"], spec["eos_ids"]) == (TOKENIZER[0], 1, [2, 3])
    assert (entry / TOKENIZER[0]).read_bytes() == TOKENIZER[1]
    assert spec["params"] == tiny_params()

    model = io.load_model(entry)
    has_chunks = any(".chunks." in name for name in model.state_dict())
    assert has_chunks == (ane_params["target_split_size"] is not None)
    params = tiny_params()
    plain = AneLlama.from_weights(params, tiny_weights(params), ane_params["max_seq_length"])
    inputs = later_call_inputs(spec, ane_params["seq_length"])
    fp32_inputs = pytree.tree_map(lambda t: t.float() if t.is_floating_point() else t, inputs)
    got, want = model(*inputs)[0].float(), plain(*fp32_inputs)[0]
    assert (got - want).abs().max() < tolerance


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
    with pytest.raises(UserError, match=r"ane\.cache_size=30"):
        run(tmp_path, ane(cache_size=30))


def test_fp16_state_is_stored_in_fp16(tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(run(tmp_path, ane()) / io.STATE_FILE))
    assert {t.dtype for t in state.values()} == {torch.float16}
