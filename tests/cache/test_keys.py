from ane_build import pipeline
from ane_build.cache import keys


def test_canonical_json_is_order_independent():
    assert keys.sha256_json({"a": 1, "b": [1, 2]}) == keys.sha256_json({"b": [1, 2], "a": 1})


def test_key_inputs_name_everything_the_rule_lists():
    stage = pipeline.BY_NAME["convert"]
    inputs = keys.key_inputs(stage, {"convert": {"format": "auto"}}, {"fetch": "f" * 64})
    assert set(inputs) == {"stage", "format_version", "params", "upstream", "code", "libraries"}
    assert {"ane_build/stages/convert.py", "ane_build/checkpoint/gguf.py"} <= set(inputs["code"])
    assert inputs["libraries"]["torch"].startswith("2.13.0")


def test_key_changes_with_each_input():
    stage = pipeline.BY_NAME["convert"]
    base = keys.stage_key(keys.key_inputs(stage, {"convert": {"format": "auto"}}, {"fetch": "a"}))
    assert base != keys.stage_key(keys.key_inputs(stage, {"convert": {"format": "gguf"}}, {"fetch": "a"}))
    assert base != keys.stage_key(keys.key_inputs(stage, {"convert": {"format": "auto"}}, {"fetch": "b"}))


def test_plan_has_no_paths_and_same_content_shares_keys(write, tmp_path):
    from ane_build import recipe
    from ane_build.cache.filehash import sha256_file

    write("a/ckpt.gguf", "GGUF-bytes")
    write("b/ckpt.gguf", "GGUF-bytes")
    ra = recipe.load(write("ra.yaml", "source: {path: a/ckpt.gguf}\n"))
    rb = recipe.load(write("rb.yaml", "source: {path: b/ckpt.gguf}\nexport: {compute_unit: ALL}\n"))
    pa, pb = pipeline.plan(ra, sha256_file), pipeline.plan(rb, sha256_file)
    assert pa["fetch"][0] == pb["fetch"][0] and pa["convert"][0] == pb["convert"][0]
    assert str(tmp_path) not in keys.canonical_json(pa)
