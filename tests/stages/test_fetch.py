import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ane_build import pipeline, recipe
from ane_build.cache.store import Store
from ane_build.stages import convert, fetch
from ane_build.util.errors import UserError, display_path
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


def refusal(call):
    """The message of the UserError ``call()`` raises: a UserError itself, not SourceMissing (that is
    for a source not there at all) nor any other exception."""
    with pytest.raises(Exception) as e:
        call()
    assert type(e.value) is UserError, repr(e.value)
    return str(e.value)


@contextlib.contextmanager
def no_hang(seconds=10):
    """Fail, not hang, if what runs inside blocks (say on opening a FIFO no one writes to)."""
    def hung(signum, frame):
        raise AssertionError(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_symlink_loop_is_refused(tmp_path, entry):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    a.symlink_to(b)
    b.symlink_to(a)
    params = {"path": str(a)}
    assert refusal(lambda: fetch.key_params(params, file_sha256)) == f"source.path: {a} is a symlink loop"
    assert refusal(lambda: fetch.run({}, params, entry)) == f"source.path: {a} is a symlink loop"


def test_a_dangling_link_is_refused_not_missing(tmp_path, entry):
    link = tmp_path / "model.gguf"
    link.symlink_to(tmp_path / "gone.gguf")
    params = {"path": str(link)}
    expected = f"source.path: {link} is a dangling link to {tmp_path / 'gone.gguf'}"
    assert refusal(lambda: fetch.key_params(params, file_sha256)) == expected
    assert refusal(lambda: fetch.run({}, params, entry)) == expected


def test_a_fifo_is_refused_without_reading_it(tmp_path, entry):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    params = {"path": str(fifo)}
    expected = f"source.path: {fifo} is a named pipe (FIFO); expected a file or a folder"
    with no_hang():
        assert refusal(lambda: fetch.key_params(params, file_sha256)) == expected
        assert refusal(lambda: fetch.run({}, params, entry)) == expected


def test_a_device_is_refused(tmp_path):
    link = tmp_path / "model.gguf"
    link.symlink_to(os.devnull)
    for path in (os.devnull, link):
        assert refusal(lambda: fetch.key_params({"path": str(path)}, file_sha256)) == (
            f"source.path: {path} is a character device; expected a file or a folder")


def test_a_package_file_that_is_a_folder_is_refused(package, entry):
    params = {"package": "ane_fetch_fake_pkg", "file": "data"}
    expected = f"source.file: {package / 'data'} is a folder; expected a file"
    assert refusal(lambda: fetch.key_params(params, file_sha256)) == expected
    assert refusal(lambda: fetch.run({}, params, entry)) == expected


def _dangling(src):
    link = src / "sub" / "model.safetensors"
    link.symlink_to(src / "gone.safetensors")
    return link, f"is a dangling link to {src / 'gone.safetensors'}"


def _self_link(src):
    link = src / "loop.json"
    link.symlink_to(link)
    return link, "is a symlink loop"


def _link_to_a_folder_above(src):
    link = src / "sub" / "up"
    link.symlink_to("..")
    return link, f"is a symlink loop: it leads back to {src}"


def _fifo(src):
    fifo = src / "sub" / "pipe"
    os.mkfifo(fifo)
    return fifo, f"is a named pipe (FIFO); expected only files and folders in {src}"


def _device(src):
    link = src / "null"
    link.symlink_to(os.devnull)
    return link, f"is a character device; expected only files and folders in {src}"


@pytest.mark.parametrize("spoil", [_dangling, _self_link, _link_to_a_folder_above, _fifo, _device])
def test_a_folder_holding_what_is_not_a_file_or_folder_is_refused(spoil, folder, entry):
    bad, problem = spoil(folder)
    params = {"path": str(folder)}
    with no_hang():
        assert refusal(lambda: fetch.key_params(params, file_sha256)) == f"source.path: {bad} {problem}"
        assert refusal(lambda: fetch.run({}, params, entry)) == f"source.path: {bad} {problem}"


NOBODY = 65534


@pytest.fixture
def open_folder(tmp_path):
    """A folder any user may enter: tmp_path, or under root (whose tmp_path is root's alone) one of its own."""
    if os.geteuid() != 0:
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="ane-fetch-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def chmod():
    """chmod(path, mode) for the test's length: the modes are put back after, so the folder can go."""
    changed = []

    def change(path, mode):
        changed.append((path, path.stat().st_mode))
        path.chmod(mode)
    yield change
    for path, mode in reversed(changed):
        path.chmod(mode)


def as_a_user(call):
    """What ``call()`` raises, as "TypeName: message" ("no error" if nothing), run as a user whom
    file modes stop: this process, or under root (whom none stops) a forked child that first
    becomes nobody."""
    def outcome():
        try:
            call()
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return "no error"
    if os.geteuid() != 0:
        return outcome()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        try:
            try:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            except OSError as e:
                os.write(write, f"cannot become nobody: {e}".encode())
            else:
                os.write(write, outcome().encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        text = f.read()
    os.waitpid(pid, 0)
    if text.startswith("cannot become nobody"):
        pytest.skip(f"run as root, and {text}: root reads whatever the modes say")
    return text


# The same bits for owner, group and others: under root, the files are root's and nobody reads them as others.
def _unreadable_file(src, chmod):
    chmod(src / "config.json", 0)
    return src / "config.json", src / "config.json"


def _unreadable_file_in_the_folder(src, chmod):
    chmod(src / "sub" / "tokenizer.json", 0)
    return src, src / "sub" / "tokenizer.json"


def _unlistable_subfolder(src, chmod):
    chmod(src / "sub", 0o333)
    return src, src / "sub"


def _subfolder_without_x(src, chmod):
    chmod(src / "sub", 0o444)
    return src, src / "sub" / "tokenizer.json"


def _file_in_a_folder_without_x(src, chmod):
    chmod(src / "sub", 0o444)
    return src / "sub" / "tokenizer.json", src / "sub" / "tokenizer.json"


@pytest.mark.parametrize("lock", [_unreadable_file, _unreadable_file_in_the_folder, _unlistable_subfolder,
                                  _subfolder_without_x, _file_in_a_folder_without_x])
def test_a_source_this_user_may_not_read_is_refused(lock, open_folder, chmod):
    src = open_folder / "SmolLM2"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "tokenizer.json").write_bytes(b"tok")
    path, denied = lock(src, chmod)
    assert as_a_user(lambda: fetch.key_params({"path": str(path)}, file_sha256)) == (
        f"UserError: source.path: {denied} cannot be read: permission denied")


def test_an_unreadable_source_is_one_error_line_naming_the_recipe_and_publishes_nothing(write, tmp_path):
    path = write("recipes/m/dev.yaml", "source: {path: ckpt.gguf}\n")
    fifo = path.parent / "ckpt.gguf"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "ane_build.cli.main", "status", "recipes/m/dev.yaml",
                           "--recipes-dir", "recipes", "--artifacts", "artifacts"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == (f"error: recipes/m/dev.yaml: source.path: {fifo} is a named pipe (FIFO); "
                           "expected a file or a folder\n")
    assert not [p for p in (tmp_path / "artifacts").rglob("*") if p.is_dir() and p.name != "store"]


def test_a_source_broken_after_planning_fails_its_build_naming_the_recipe(write, tmp_path):
    path = write("recipes/m/dev.yaml", "source: {path: ckpt.gguf}\n")
    ckpt = path.parent / "ckpt.gguf"
    ckpt.write_bytes(BODY)
    store = Store(tmp_path / "artifacts")
    rec = recipe.load(path, tmp_path / "recipes")
    planned = pipeline.plan(rec, store.hasher)
    ckpt.unlink()
    ckpt.symlink_to(tmp_path / "gone.gguf")
    with pytest.raises(UserError) as e:
        pipeline.build(store, rec, "fetch", planned)
    assert str(e.value) == f"{rec['path']}: source.path: {ckpt} is a dangling link to {tmp_path / 'gone.gguf'}"
    assert not store.is_valid("fetch", planned["fetch"][0])
    assert not (tmp_path / "artifacts" / "store" / "fetch" / planned["fetch"][0]).exists()


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


@pytest.mark.parametrize("target, problem", [("gone.gguf", "is a dangling link to gone.gguf"),
                                             ("ckpt.gguf", "is a symlink loop")])
def test_a_recipe_whose_source_is_a_broken_link_names_the_link(target, problem, write, tmp_path):
    path = write("recipes/m/dev.yaml", "source: {path: ckpt.gguf}\n")
    link = path.parent / "ckpt.gguf"
    link.symlink_to(target)
    store = Store(tmp_path / "artifacts")
    assert refusal(lambda: pipeline.plan(recipe.load(path, tmp_path / "recipes"), store.hasher)) == (
        f"{display_path(path)}: source.path: {link} {problem}")


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

