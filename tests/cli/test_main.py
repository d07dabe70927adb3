import json
import subprocess
import sys

import jsonschema
import yaml

from ane_build import pipeline, recipe
from ane_build.analysis import cost
from ane_build.cache.store import Store
from ane_build.cli import main as cli
from ane_build.stages import quantize
from tests.test_recipe import SOURCE


def test_schema_is_valid_json_schema_that_accepts_the_shipped_recipes(capsys):
    assert cli.main(["schema"]) == 0
    doc = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(doc)
    # The recipe schema offers exactly the kinds the quantize stage makes.
    assert doc["properties"]["quantize"]["properties"]["linear"]["enum"] == list(quantize.LINEAR_KINDS)
    for path in recipe.discover(cli.Path(__file__).parents[2] / "recipes"):
        jsonschema.validate(yaml.safe_load(path.read_text()), doc)


def test_schema_rejects_what_the_loader_rejects(capsys):
    cli.main(["schema"])
    doc = json.loads(capsys.readouterr().out)
    bad = {"quantize": {"linear": "c5w"}}
    assert not jsonschema.Draft202012Validator(doc).is_valid(bad)


def test_status_lists_keys_without_building(write, tmp_path, capsys):
    write("recipes/m/ckpt.gguf", "GGUF")
    write("recipes/m/dev.yaml", "source: {path: ckpt.gguf}\n")
    code = cli.main(["status", "--recipes-dir", str(tmp_path / "recipes"), "--artifacts", str(tmp_path / "a")])
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and [line.split()[0].split(":")[0] for line in out] == [s.name for s in pipeline.stages_of({})]
    assert all(line.endswith("missing") for line in out)
    assert not [p for p in (tmp_path / "a" / "store").iterdir() if p.is_dir()]  # only the hash memo


def test_status_shows_the_commit_a_hub_source_fetches(hub, write, tmp_path, capsys):
    write("repo/config.json", "{}")
    sha = hub.push("org/tiny", tmp_path / "repo")
    write("recipes/m/moving.yaml", "source: {hf: org/tiny, revision: main, allow_moving_revision: true}\n")
    write("recipes/m/pinned.yaml", f"source: {{hf: org/tiny, revision: '{sha}'}}\n")
    assert cli.main(["status", "--recipes-dir", str(tmp_path / "recipes"), "--artifacts", str(tmp_path / "a")]) == 0
    moving, pinned = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("fetch:")]
    assert moving[1] == pinned[1]  # one key: the commit's
    assert moving[-2:] == [f"org/tiny@{sha}", "(main)"] and pinned[-1] == f"org/tiny@{sha}"


def test_a_hub_error_is_one_line_and_exit_1_in_a_fresh_process(hub, write, tmp_path):
    """The Hub as huggingface_hub finds it in a build: from HF_ENDPOINT, read when it is first imported."""
    path = write("recipes/m/dev.yaml", "source: {hf: org/gone, revision: main, allow_moving_revision: true}\n")
    proc = subprocess.run([sys.executable, "-m", "ane_build.cli.main", "status", str(path),
                           "--recipes-dir", str(tmp_path / "recipes"), "--artifacts", str(tmp_path / "a")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: ") and proc.stderr.endswith(
        f"dev.yaml: source.hf: no model repo org/gone on {hub.url} (if it is private, set HF_TOKEN)\n")
    assert ("GET", "/api/models/org/gone/revision/main") in hub.requests


def test_user_error_is_one_line_and_exit_1(write, tmp_path):
    path = write("recipes/m/dev.yaml", SOURCE + "ane: {seq_length: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "ane_build.cli.main", "status", str(path),
                           "--recipes-dir", str(tmp_path / "recipes")], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "ane.seq_length: expected at least 1; got 0" in proc.stderr


def test_status_shows_a_built_exports_decode_cost_and_the_devices_bound(tmp_path):
    spec = {"params": {"dim": 8, "hidden_dim": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "vocab_size": 32},
            "ane": {"dtype": "fp16", "seq_length": 4, "cache_size": 12, "decode_method": True},
            "quantize": {"weight_groups": {"linear:c8w": {"bits": 8, "params": 1000}}}}
    store = Store(tmp_path)
    store.entry("export", "k").mkdir(parents=True)
    cost.write(spec, store.entry("export", "k"))
    # With a decode method, forward is the one-token call: the cheapest per decoded token.
    per_token = cost.costs(spec)["forward"]["bytes_per_decoded_token"]
    assert per_token < cost.costs(spec)["prefill"]["bytes_per_decoded_token"]
    line = cli._decode_cost("export", store, "k", "iPad Pro (M4)")
    assert line == (f"  forward: {per_token / 1e6:.1f} MB read per token, at most {round(120e9 / per_token, 1)} "
                    "tokens/s on iPad Pro (M4) (bandwidth bound)")
    assert cli._decode_cost("export", store, "k", "elsewhere").endswith("MB read per token")
    assert cli._decode_cost("smoke", store, "k", "iPad Pro (M4)") == ""
