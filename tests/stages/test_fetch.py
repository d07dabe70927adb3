import hashlib
import json
import os
import shutil
import sys

import pytest

from ane_build import pipeline, recipe
from ane_build.errors import UserError
from ane_build.stages import convert, fetch
from ane_build.store import Store
from tests import https_server
from tests.tiny_llama import tiny_params, tiny_weights, write_hf

BODY = os.urandom(50_000)
SHA = hashlib.sha256(BODY).hexdigest()


def file_sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def entry(tmp_path):
    """The store's temporary entry folder, as the store hands it to a stage."""
    return tmp_path / "store" / "fetch" / "tmp-entry"


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "SmolLM2"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "tokenizer.json").write_bytes(b"tok")
    return src


@pytest.fixture
def package(tmp_path, monkeypatch):
    """An installed package whose import fails, holding a data file."""
    root = tmp_path / "site"
    pkg = root / "ane_fetch_fake_pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "data" / "model.gguf").write_bytes(BODY)
    monkeypatch.syspath_prepend(str(root))
    return pkg


def test_path_file_is_copied(tmp_path, entry):
    src = tmp_path / "model.gguf"
    src.write_bytes(BODY)
    metrics = fetch.run({}, {"path": str(src)}, entry)
    out = entry / "source" / "model.gguf"
    assert out.read_bytes() == BODY and not out.is_symlink()
    assert metrics["kind"] == "path" and metrics["bytes"] == len(BODY)
    assert fetch.digest({"path": str(src)}, file_sha256) == SHA
    assert fetch.source_name({"path": str(src)}) == "model.gguf"


def test_path_folder_is_copied(folder, entry):
    metrics = fetch.run({}, {"path": str(folder)}, entry)
    out = entry / "source" / "SmolLM2"
    assert (out / "config.json").read_text() == "{}"
    assert (out / "sub" / "tokenizer.json").read_bytes() == b"tok"
    assert metrics == {"kind": "path", "bytes": 5, "seconds": metrics["seconds"]}


def test_folder_digest_follows_contents_not_location(folder, tmp_path):
    before = fetch.digest({"path": str(folder)}, file_sha256)
    moved = shutil.copytree(folder, tmp_path / "elsewhere")
    assert fetch.digest({"path": str(moved)}, file_sha256) == before
    (moved / "sub" / "tokenizer.json").rename(moved / "sub" / "tokenizer2.json")
    assert fetch.digest({"path": str(moved)}, file_sha256) != before
    (folder / "config.json").write_text('{"dim": 1}')
    assert fetch.digest({"path": str(folder)}, file_sha256) != before


def test_package_file_is_found_without_importing(package, entry):
    params = {"package": "ane_fetch_fake_pkg", "file": "data/model.gguf"}
    assert fetch.locate(params) == package / "data" / "model.gguf"
    assert fetch.digest(params, file_sha256) == SHA
    metrics = fetch.run({}, params, entry)
    assert (entry / "source" / "model.gguf").read_bytes() == BODY
    assert metrics["kind"] == "package"
    assert fetch.source_name(params) == "model.gguf"
    assert "ane_fetch_fake_pkg" not in sys.modules


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(UserError, match=f"^source.path: {missing} does not exist$"):
        fetch.locate({"path": str(missing)})


def test_missing_package():
    with pytest.raises(UserError, match="^source.package: no installed package named "
                                        "'ane_no_such_pkg'$"):
        fetch.locate({"package": "ane_no_such_pkg", "file": "x.gguf"})


def test_missing_file_in_package(package):
    with pytest.raises(UserError) as e:
        fetch.digest({"package": "ane_fetch_fake_pkg", "file": "x.gguf"}, file_sha256)
    assert str(e.value) == ("source.file: 'x.gguf' not found in package ane_fetch_fake_pkg "
                            f"(at {package})")


def test_url_is_downloaded_and_verified(tmp_path, entry, monkeypatch):
    cert, key = https_server.make_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with https_server.serve(cert, key, {"/dl/model.gguf": BODY}) as (base, state):
        params = {"url": base + "/dl/model.gguf?download=true", "sha256": SHA}
        metrics = fetch.run({}, params, entry)
        assert (entry / "source" / "model.gguf").read_bytes() == BODY
        assert metrics["kind"] == "url" and metrics["bytes"] == len(BODY)
        assert fetch.digest(params, file_sha256) == SHA

        named = {**params, "file": "smol.gguf"}
        assert fetch.source_name(params) == "model.gguf"
        assert fetch.source_name(named) == "smol.gguf"
        fetch.run({}, named, entry.with_name("other-entry"))
        assert (entry.with_name("other-entry") / "source" / "smol.gguf").read_bytes() == BODY
    # The partial file lives beside the entries and is gone once published.
    assert list((entry.parent / "partial").glob("*.part")) == []


def test_url_without_https_is_refused(entry):
    with pytest.raises(UserError, match="^http://example.org/m.gguf: only https://"):
        fetch.run({}, {"url": "http://example.org/m.gguf", "sha256": SHA}, entry)


def test_url_file_name_must_be_plain(entry):
    with pytest.raises(UserError, match="^source.file: "):
        fetch.run({}, {"url": "https://127.0.0.1/m.gguf", "sha256": SHA, "file": "../x"}, entry)


HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model"]


@pytest.fixture
def tiny_repo(hub, tmp_path):
    """A tiny Llama as a Hugging Face repo on the Hub stand-in, beside a file its recipes leave out:
    (repo id, commit, the folder it was pushed from)."""
    params = tiny_params()
    folder = write_hf(params, tiny_weights(params), tmp_path / "Tiny-Llama")
    (folder / "pytorch_model.bin").write_bytes(b"the same weights, pickled")
    return "org/Tiny-Llama", hub.push("org/Tiny-Llama", folder), folder


@pytest.fixture
def hub_recipe(write, tmp_path):
    """hub_recipe(name, repo, revision, moving=False): a loaded recipe fetching HUB_FILES of the repo."""
    def load(name, repo, revision, moving=False):
        flag = ", allow_moving_revision: true" if moving else ""
        text = f"source: {{hf: {repo}, revision: '{revision}', files: {json.dumps(HUB_FILES)}{flag}}}\n"
        return recipe.load(write(f"recipes/m/{name}.yaml", text), tmp_path / "recipes")
    return load


def test_hub_repo_is_fetched_at_its_commit_and_converts(tiny_repo, entry, tmp_path):
    repo, sha, _ = tiny_repo
    metrics = fetch.run({}, {"hf": repo, "revision": sha, "files": HUB_FILES}, entry)
    out = entry / "source" / "Tiny-Llama"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert metrics["kind"] == "hf" and metrics["commit"] == sha
    converted = tmp_path / "convert"
    converted.mkdir()
    assert convert.run({"fetch": entry}, {"format": "auto"}, converted)["format"] == "hf"
    assert (converted / "params.json").is_file() and (converted / "model.safetensors").is_file()


def test_hub_key_is_the_repo_commit_and_globs(hub, tiny_repo):
    repo, sha, _ = tiny_repo
    hub.setenv(HF_TOKEN="s3cret")
    params = {"hf": repo, "revision": sha, "files": ["tokenizer.model", "*.json", "*.safetensors", "*.json"]}
    key = fetch.key_params(params, file_sha256)
    assert key == {"hf": repo, "commit": sha, "files": sorted(HUB_FILES)}
    assert "s3cret" not in json.dumps(key) and hub.url not in json.dumps(key)
    assert fetch.key_params({"hf": repo, "revision": sha}, file_sha256)["files"] is None


def test_a_second_plan_of_the_same_commit_reuses_the_fetch_entry(hub, tiny_repo, hub_recipe, tmp_path):
    repo, sha, _ = tiny_repo
    store = Store(tmp_path / "artifacts")
    pinned = hub_recipe("pinned", repo, sha)
    planned = pipeline.plan(pinned, store.hasher)
    entry, built = pipeline.build(store, pinned, "fetch", planned)
    assert built and (entry / "source" / "Tiny-Llama" / "config.json").is_file()
    asked = len(hub.requests)
    assert pipeline.build(store, pinned, "fetch", pipeline.plan(pinned, store.hasher)) == (entry, False)
    # Another recipe, by the branch that points at the same commit: one question when planned, no fetch.
    moving = hub_recipe("moving", repo, "main", moving=True)
    replanned = pipeline.plan(moving, store.hasher)
    assert replanned["fetch"][0] == planned["fetch"][0]
    assert pipeline.build(store, moving, "fetch", replanned) == (entry, False)
    assert hub.requests[asked:] == [("GET", f"/api/models/{repo}/revision/main")]


def test_a_moving_revision_is_resolved_when_planned_and_recorded(hub, tiny_repo, hub_recipe, tmp_path):
    repo, first, folder = tiny_repo
    store = Store(tmp_path / "artifacts")
    rec = hub_recipe("moving", repo, "main", moving=True)
    planned = pipeline.plan(rec, store.hasher)
    assert planned["fetch"][1]["params"] == {"hf": repo, "commit": first, "files": sorted(HUB_FILES)}
    config = (folder / "config.json").read_text()
    (folder / "config.json").write_text(config.replace("silu", "gelu"))
    second = hub.push(repo, folder)  # the branch moves after the plan: the build fetches what its key names
    entry, _ = pipeline.build(store, rec, "fetch", planned)
    assert (entry / "source" / "Tiny-Llama" / "config.json").read_text() == config
    manifest = store.manifest("fetch", planned["fetch"][0])
    assert manifest["key_inputs"]["params"]["commit"] == first and manifest["metrics"]["commit"] == first
    replanned = pipeline.plan(rec, store.hasher)
    assert replanned["fetch"][1]["params"]["commit"] == second and replanned["fetch"][0] != planned["fetch"][0]


def test_hub_errors_name_the_recipe(hub, hub_recipe, tmp_path):
    store = Store(tmp_path / "artifacts")
    rec = hub_recipe("gone", "org/gone", "main", moving=True)
    with pytest.raises(UserError) as e:
        pipeline.plan(rec, store.hasher)  # a moving revision is asked when planning
    assert str(e.value) == (f"{rec['path']}: source.hf: no model repo org/gone on {hub.url} "
                            "(if it is private, set HF_TOKEN)")
    rec = hub_recipe("pinned", "org/gone", "0" * 40)
    planned = pipeline.plan(rec, store.hasher)  # a commit needs no question: it fails when fetched
    with pytest.raises(UserError, match=f"^{rec['path']}: source.hf: no model repo org/gone "):
        pipeline.build(store, rec, "fetch", planned)
    assert not store.is_valid("fetch", planned["fetch"][0])
