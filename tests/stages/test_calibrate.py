import json

import pytest

from ane_build.analysis import quality
from ane_build.quant import calibration, calibration_text
from ane_build.stages import calibrate
from ane_build.util.errors import UserError
from tests.stages.tiny_export import convert_entry
from tests.tiny_llama import tiny_params, tiny_weights

SETTINGS = {"text": None, "windows": 2, "window_tokens": 16}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert_entry(tmp_path_factory.mktemp("calibrate") / "convert", tiny_weights(tiny_params()))


def run(converted, tmp_path, settings):
    out = tmp_path / "calibrate"
    out.mkdir()
    return calibrate.run({"convert": converted}, settings, out), out


def test_every_linear_of_the_checkpoint_gets_its_statistics(converted, tmp_path):
    metrics, out = run(converted, tmp_path, SETTINGS)
    stats = calibration.load(out / calibration.FILE)
    params = tiny_params()
    names = {f"layers.{i}.{kind}.{w}" for i in range(params["n_layers"])
             for kind, ws in (("attention", ("wq", "wk", "wv", "wo")), ("feed_forward", ("w1", "w2", "w3")))
             for w in ws} | {"output"}
    assert set(stats) == names
    assert stats["output"]["fisher"].shape == (params["vocab_size"], params["dim"])
    assert stats["layers.0.feed_forward.w2"]["xtx"].shape == (params["hidden_dim"],) * 2
    assert all((s["fisher"] >= 0).all() and s["fisher"].sum() > 0 for s in stats.values())
    report = json.loads((out / calibrate.REPORT_FILE).read_text())
    assert (report["windows"], report["window_tokens"]) == (2, 16) and metrics["calibration_tokens"] == 32
    assert report["sha256"] == calibration_text.sha256(calibration_text.pydoc_text(quality.held_out_topics()))


def test_a_named_text_file_is_read_and_keyed_by_its_bytes_not_its_folder(converted, tmp_path):
    from ane_build import pipeline, recipe

    text = tmp_path / "mine.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    _, out = run(converted, tmp_path, {**SETTINGS, "text": str(text)})
    assert json.loads((out / calibrate.REPORT_FILE).read_text())["text"] == "mine.txt"

    def key(path):
        rec = recipe.validate({"source": {"path": "/models/tiny"}, "calibrate": {"text": str(path)},
                               "quantize": {"fit": "fisher", "linear": "lut6"}}, "recipes/tiny.yaml")
        return pipeline.key_params(pipeline.BY_NAME["calibrate"], rec, None)

    before = key(text)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mine.txt").write_bytes(text.read_bytes())
    assert key(tmp_path / "elsewhere" / "mine.txt") == before  # the same bytes in another folder
    text.write_text("a lazy dog sleeps. " * 80)
    assert key(text) != before


@pytest.mark.parametrize("content, expected", [
    (None, "calibration text not found"),
    (b"\xff\xfe not utf-8", "calibration text is not UTF-8"),
    ("too short", "windows of 16; 2 asked for"),
])
def test_a_bad_text_file_is_one_line_naming_it_and_writes_nothing(converted, tmp_path, content, expected):
    text = tmp_path / "text.txt"
    if isinstance(content, bytes):
        text.write_bytes(content)
    elif content is not None:
        text.write_text(content)
    with pytest.raises(UserError) as err:
        run(converted, tmp_path, {**SETTINGS, "text": str(text)})
    assert str(err.value).startswith(str(text)) and expected in str(err.value) and "\n" not in str(err.value)
    assert not any((tmp_path / "calibrate").iterdir())
