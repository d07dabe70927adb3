"""The remote cache against a real S3-protocol server (moto, on 127.0.0.1) and against file://.

Store-level cases use fake stage functions (our own code; the remote, fsspec, s3fs and the server
are real); doit-level ones the tiny project of test_tasks, through convert.
"""

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from ane_build import pipeline, recipe
from ane_build.cache import keys
from ane_build.cache.remote import Remote
from ane_build.cache.store import Store
from tests import test_tasks
from tests.s3_server import BUCKET, free_port
from tests.test_tasks import ROOT, executed

project = test_tasks.project  # the tiny project: two devices of one tiny GGUF model

STAGE = "s"


def entry_key(n=1):
    inputs = {"stage": STAGE, "n": n}
    return keys.stage_key(inputs), inputs


def produce(out, size=1000, seed=b""):
    (out / "a.bin").write_bytes(seed + os.urandom(size))
    (out / "sub").mkdir()
    (out / "sub" / "b.txt").write_text("hello")


def warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name.startswith("ane_build")]


def never(out):
    raise AssertionError("the stage ran")


@pytest.fixture(params=["file", "s3"])
def url(request, tmp_path):
    """A fresh, empty remote cache of each kind."""
    if request.param == "file":
        return f"file://{tmp_path}/remote"
    request.getfixturevalue("s3")
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"


def remote_files(url):
    """Every file under the remote cache, relative to it."""
    fs, root = Remote(url).fs, Remote(url).root
    return sorted(p[len(root) + 1:] for p in fs.find(root)) if fs.exists(root) else []


def built_and_pushed(tmp_path, url, n=1, size=1000):
    store = Store(tmp_path / f"built-{uuid.uuid4().hex[:6]}")
    key, inputs = entry_key(n)
    store.build(STAGE, key, inputs, lambda out: produce(out, size))
    remote = Remote(url)
    remote.push(store, STAGE, key)
    remote.wait()
    return store, key


def put(remote, path, data):
    remote.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)  # a folder for file://; nothing on S3
    remote.fs.pipe_file(path, data)


def rewrite_remote(url, key, edit):
    """Replace the remote entry's manifest and each blob it lists by ``edit(path under the remote, bytes)``,
    e.g. to tamper with it; None leaves one as it is."""
    remote = Remote(url)
    manifest = remote._path(STAGE, key, "manifest.json")
    blobs = [remote._blob(meta["sha256"]) for meta in json.loads(remote.fs.cat_file(manifest))["files"].values()]
    for path in [manifest, *blobs]:
        data = edit(path[len(remote.root) + 1:], remote.fs.cat_file(path))
        if data is not None:
            put(remote, path, data)


def spoiled_blobs(size=None):
    """An edit for ``rewrite_remote``: each blob (of ``size`` bytes, if given) overwritten with as many x's."""
    return lambda rel, data: b"x" * len(data) if rel.startswith("blobs/") and size in (None, len(data)) else None


def test_push_after_build_then_a_pull_instead_of_a_build(tmp_path, url):
    store, key = built_and_pushed(tmp_path, url)
    manifest = json.loads((store.entry(STAGE, key) / "manifest.json").read_text())
    assert remote_files(url) == sorted([f"{STAGE}/{key}/manifest.json"] + [
        f"blobs/{meta['sha256']}" for meta in manifest["files"].values()])
    other = Store(tmp_path / "other")
    assert Remote(url).pull(other, STAGE, key) == (other.entry(STAGE, key), True) and other.is_valid(STAGE, key)
    entry = other.entry(STAGE, key)
    for rel in ("a.bin", "sub/b.txt", "manifest.json"):  # the manifest byte for byte: its timings and metrics too
        assert (entry / rel).read_bytes() == (store.entry(STAGE, key) / rel).read_bytes()
    assert other.build(STAGE, key, {}, never) == (entry, False)


def test_a_content_two_entries_hold_is_stored_once(tmp_path, url):
    """A release bundle's model.pte is its export's: the second entry uploads only what is new."""
    store, first = built_and_pushed(tmp_path, url)
    before = remote_files(url)
    second, inputs = entry_key(2)

    def first_and_one_more(out):
        shutil.copytree(store.entry(STAGE, first), out, dirs_exist_ok=True, ignore=lambda *_: ["manifest.json"])
        (out / "c.txt").write_text("new")

    store.build(STAGE, second, inputs, first_and_one_more)
    remote = Remote(url)
    remote.push(store, STAGE, second)
    remote.wait()
    added = sorted(set(remote_files(url)) - set(before))
    assert added == sorted([f"{STAGE}/{second}/manifest.json", f"blobs/{hashlib.sha256(b'new').hexdigest()}"])
    pulled, _ = Remote(url).pull(Store(tmp_path / "other"), STAGE, second)
    assert sorted(p.name for p in pulled.rglob("*") if p.is_file()) == ["a.bin", "b.txt", "c.txt", "manifest.json"]


def test_a_missing_entry_is_a_miss_and_no_warning(tmp_path, url, caplog):
    assert Remote(url).pull(Store(tmp_path), STAGE, entry_key()[0]) is None
    assert Remote(url).lookup(STAGE, entry_key()[0]) is None and not warnings(caplog)


@pytest.mark.parametrize("where", ["blob", "manifest size"])
def test_a_flipped_byte_is_refused_rebuilt_and_not_trusted_again_in_the_run(tmp_path, url, where, caplog):
    _, key = built_and_pushed(tmp_path, url)
    good = {}

    def flip(rel, data):
        good[rel] = data
        if where == "blob" and rel.startswith("blobs/") and len(data) == 1000:
            return bytes([data[0] ^ 1]) + data[1:]
        if where == "manifest size" and rel.endswith("/manifest.json"):
            return data.replace(b'"size": 5', b'"size": 6')
        return None

    rewrite_remote(url, key, flip)
    remote, store = Remote(url), Store(tmp_path / "other")
    assert remote.pull(store, STAGE, key) is None
    assert not store.entry(STAGE, key).exists() and not list(store.entry(STAGE, key).parent.glob(".tmp-*"))
    [warning] = warnings(caplog)
    assert f"refused {STAGE}/{key[:12]}" in warning and "building it locally" in warning
    rewrite_remote(url, key, lambda rel, data: good[rel])  # mended behind the run's back: still not asked
    assert remote.pull(store, STAGE, key) is None and remote.lookup(STAGE, key) is None
    assert Remote(url).pull(Store(tmp_path / "next run"), STAGE, key) is not None


def test_a_rebuilt_entry_replaces_the_refused_one(tmp_path, url):
    _, key = built_and_pushed(tmp_path, url)
    rewrite_remote(url, key, spoiled_blobs())
    remote, store = Remote(url), Store(tmp_path / "other")
    entry, how = obtain_fake(store, remote, key)
    assert how == "built"
    remote.wait()
    pulled, _ = Remote(url).pull(Store(tmp_path / "third"), STAGE, key)
    assert (pulled / "a.bin").read_bytes() == (entry / "a.bin").read_bytes()


def obtain_fake(store, remote, key, run=produce):
    """pipeline.obtain's path for one stage, with a fake stage: pull, else build and push."""
    pulled = remote.pull(store, STAGE, key)
    if pulled:
        return pulled[0], "pulled"
    entry, built = store.build(STAGE, key, entry_key()[1], run)
    remote.push(store, STAGE, key)
    return entry, "built" if built else "cached"


def _lie(manifest, key, lie):
    if lie == "copied":  # another entry's manifest as it is
        return "its manifest is for another entry"
    manifest["key"] = key  # its key field lies; its key inputs are still the other entry's
    if lie == "path":
        manifest["key_inputs"] = entry_key(1)[1]
        manifest["files"]["../../escaped"] = manifest["files"].pop("sub/b.txt")
        return "its manifest lists '../../escaped' wrongly"
    return "its manifest's key inputs do not hash to its key"


@pytest.mark.parametrize("lie", ["copied", "key", "path"])
def test_a_manifest_that_lies_is_refused(tmp_path, url, lie, caplog):
    """Another entry's complete files and manifest, put where key 1 belongs, its manifest edited to pass."""
    _, other_key = built_and_pushed(tmp_path, url, n=2)
    key = entry_key(1)[0]
    remote = Remote(url)
    for path in remote.fs.find(remote._path(STAGE, other_key)):
        data = remote.fs.cat_file(path)
        if path.endswith("manifest.json"):
            manifest = json.loads(data)
            reason = _lie(manifest, key, lie)
            data = json.dumps(manifest).encode()
        put(remote, path.replace(other_key, key), data)
    store = Store(tmp_path / "reader")
    assert remote.pull(store, STAGE, key) is None
    assert not store.entry(STAGE, key).exists() and not (tmp_path / "escaped").exists()
    assert warnings(caplog) == [
        f"remote cache {url}: refused {STAGE}/{key[:12]}: {reason}; building it locally"]


def remote_state(url):
    remote = Remote(url)
    return {path: remote.fs.cat_file(path) for path in remote.fs.find(remote.root)} if remote.fs.exists(remote.root) else {}


def test_read_only_mode_pulls_and_never_writes(tmp_path, url):
    _, key = built_and_pushed(tmp_path, url)
    # Its a.bin, which no other entry holds (b.txt, the same in each, is the next test's case).
    rewrite_remote(url, key, spoiled_blobs(size=1000))
    before = remote_state(url)
    reader, store = Remote(url, mode="read"), Store(tmp_path / "reader")
    assert obtain_fake(store, reader, key)[1] == "built"  # refused, rebuilt, and not repaired: read only
    assert obtain_fake(store, reader, entry_key(2)[0])[1] == "built"  # built, and not pushed
    reader.wait()
    assert remote_state(url) == before
    _, key3 = built_and_pushed(tmp_path, url, n=3)
    assert reader.pull(Store(tmp_path / "third"), STAGE, key3) is not None


def test_a_bad_blob_entries_share_is_mended_by_the_first_run_that_refuses_it(tmp_path, url):
    _, second = built_and_pushed(tmp_path, url, n=2)
    _, first = built_and_pushed(tmp_path, url)  # b.txt's blob is held already: not uploaded again
    rewrite_remote(url, first, spoiled_blobs(size=5))
    assert Remote(url).pull(Store(tmp_path / "r1"), STAGE, second) is None  # the blob is the second's too
    writer = Remote(url)
    assert obtain_fake(Store(tmp_path / "w"), writer, first)[1] == "built"  # refused, rebuilt, pushed over it
    writer.wait()
    assert Remote(url).pull(Store(tmp_path / "r2"), STAGE, second) is not None  # mended for both


KILLED_PUSH = """
import sys
from ane_build.cache.remote import Remote
from ane_build.cache.store import Store
remote = Remote(sys.argv[2])
remote.push(Store(sys.argv[1]), "s", sys.argv[3])
remote.wait()
"""


def test_kill_9_during_a_push_leaves_no_entry_and_a_later_push_completes(tmp_path, s3):
    """An s3fs multipart upload (over 100 MB) killed between its parts: no object, no manifest."""
    url, prefix = s3.url("killed"), "killed/"
    store, (key, inputs) = Store(tmp_path / "built"), entry_key()
    store.build(STAGE, key, inputs, lambda out: produce(out, size=120 << 20))
    proc = subprocess.Popen([sys.executable, "-c", KILLED_PUSH, str(store.root), url, key], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not s3.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads"):
        assert proc.poll() is None and time.monotonic() < deadline, "the push ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    big = json.loads((store.entry(STAGE, key) / "manifest.json").read_text())["files"]["a.bin"]["sha256"]
    assert not [k for k in s3.keys(prefix) if k.endswith(("manifest.json", big))]
    assert Remote(url).lookup(STAGE, key) is None and Remote(url).pull(Store(tmp_path / "r"), STAGE, key) is None
    remote = Remote(url)
    remote.push(store, STAGE, key)
    remote.wait()
    reader = Store(tmp_path / "r2")
    assert Remote(url).pull(reader, STAGE, key) == (reader.entry(STAGE, key), True) and reader.is_valid(STAGE, key)


def _pull_into(root, url, barrier, results):
    barrier.wait()
    results.put(Remote(url).pull(Store(root), STAGE, entry_key()[0])[1])


def test_concurrent_pulls_into_one_store_download_once(tmp_path, url):
    _, key = built_and_pushed(tmp_path, url, size=20 << 20)
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_pull_into, args=(tmp_path / "one", url, barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert sorted(results.get() for _ in procs) == [False, False, True]  # the others found it published
    assert Store(tmp_path / "one").is_valid(STAGE, key)


def _push_own_build(root, url, seed, barrier):
    store, (key, inputs) = Store(root), entry_key()
    store.build(STAGE, key, inputs, lambda out: produce(out, 20 << 20, seed))
    barrier.wait()
    Remote(url).push(store, STAGE, key)  # in a child process: at once, not in the background


def test_concurrent_pushes_of_one_key_with_different_bytes_never_mix(tmp_path, url):
    """Builds that are not byte-reproducible: whichever manifest lands last, its files are all there."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_push_own_build, args=(tmp_path / f"b{i}", url, b"%d" % i, barrier))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0, 0, 0]
    key = entry_key()[0]
    pulled, _ = Remote(url).pull(Store(tmp_path / "reader"), STAGE, key)
    winner = tmp_path / f"b{(pulled / 'a.bin').read_bytes()[:1].decode()}"
    assert (pulled / "a.bin").read_bytes() == (Store(winner).entry(STAGE, key) / "a.bin").read_bytes()
    blobs = [p for p in remote_files(url) if p.startswith("blobs/")]
    assert len(blobs) >= 3  # b.txt once (the same bytes), a.bin from at least two pushers: they did race


def _dead_s3(monkeypatch, endpoint):
    from tests.s3_server import S3

    for name, value in S3(endpoint).env.items():
        monkeypatch.setenv(name, value)
    return Remote(f"s3://{BUCKET}/x", timeout=1)


def test_the_server_down_costs_one_warning_and_the_build_goes_on(tmp_path, monkeypatch, caplog):
    remote, store = _dead_s3(monkeypatch, f"http://127.0.0.1:{free_port()}"), Store(tmp_path)
    started = time.monotonic()
    assert [obtain_fake(store, remote, entry_key(n)[0])[1] for n in range(3)] == ["built"] * 3
    remote.wait()
    assert remote.lookup(STAGE, entry_key(1)[0]) is None and time.monotonic() - started < 10
    [warning] = warnings(caplog)
    assert warning.startswith(f"remote cache s3://{BUCKET}/x: EndpointConnectionError: Could not connect")
    assert warning.endswith("; building locally for the rest of this run")


def test_a_server_that_never_answers_costs_the_timeout_once(tmp_path, monkeypatch, caplog):
    with socket.socket() as silent:  # accepts connections (the kernel does), never reads or answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        remote = _dead_s3(monkeypatch, f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        assert remote.pull(Store(tmp_path), STAGE, entry_key()[0]) is None
        first = time.monotonic() - started
        assert remote.pull(Store(tmp_path), STAGE, entry_key(2)[0]) is None
    assert first < 8 and time.monotonic() - started - first < 0.1
    [warning] = warnings(caplog)
    assert "ReadTimeoutError" in warning


def test_the_pipeline_pulls_what_is_asked_for_and_pulls_the_rest_when_a_build_needs_it(project, tmp_path, url,
                                                                                       monkeypatch):
    rec = recipe.load(project / "recipes/tiny/a.yaml", project / "recipes")
    builder = Store(tmp_path / "builder")
    planned = pipeline.plan(rec, builder.hasher)
    key = {name: key for name, (key, _) in planned.items()}
    remote = Remote(url)
    assert pipeline.obtain(builder, rec, "convert", planned, remote)[1] == "built"  # fetch too, as its input
    remote.wait()
    for stage in ("fetch", "convert"):  # from here on, running either is a failure
        monkeypatch.setattr(pipeline.BY_NAME[stage].module, "run", lambda *args: never(None))
    store, remote = Store(tmp_path / "puller"), Remote(url)
    assert pipeline.obtain(store, rec, "fetch", planned, remote, local=False) == (
        f"{url}/fetch/{key['fetch']}", "remote")
    entry, how = pipeline.obtain(store, rec, "convert", planned, remote)
    assert how == "pulled" and store.is_valid("convert", key["convert"]) and not store.entry("fetch", key["fetch"]).exists()
    assert store.view("tiny/a", "convert").resolve() == entry.resolve()

    fresh, remote, rewrites = Store(tmp_path / "fresh"), Remote(url), []

    def fake_rewrite(inputs, params, out):
        rewrites.append(fresh.is_valid("convert", key["convert"]) and inputs["convert"] == fresh.entry("convert", key["convert"]))
        (out / "spec.json").write_text("{}")

    monkeypatch.setattr(pipeline.BY_NAME["rewrite"].module, "run", fake_rewrite)
    assert [pipeline.obtain(fresh, rec, stage, planned, remote, local=False)[1]
            for stage in ("fetch", "convert", "rewrite")] == ["remote", "remote", "built"]
    assert rewrites == [True]  # convert was pulled for it; fetch, which nothing built on, stayed remote
    assert not fresh.entry("fetch", key["fetch"]).exists()


def run_doit(project, artifacts, *args, env=None):
    env = {**os.environ, "ANE_BUILD_RECIPES": str(project / "recipes"), "ANE_BUILD_ARTIFACTS": str(artifacts),
           "ANE_BUILD_DEFAULT": "tiny/a", "ANE_BUILD_CONFIG": str(project / "ane-build.toml"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "doit", "-f", str(ROOT / "dodo.py"), *args],
                          env=env, capture_output=True, text=True, cwd=project)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def outcomes(proc):
    """{task: how it ended}, from the lines that end a stage."""
    return {task: verb for verb, task in re.findall(r"^(built|cached|pulled|remote) +(\S+)", proc.stdout, re.M)}


def test_doit_pushes_and_another_artifacts_folder_pulls_what_it_asks_for(project, tmp_path):
    """The remote named in the project's ane-build.toml; status says where each stage is."""
    (project / "ane-build.toml").write_text(f'[cache]\nurl = "file://{tmp_path}/remote"\n')
    built = run_doit(project, tmp_path / "a", "convert:tiny/a")
    assert outcomes(built) == {"fetch:tiny/a": "built", "convert:tiny/a": "built"}
    first = run_doit(project, tmp_path / "b", "convert:tiny/a")
    assert outcomes(first) == {"fetch:tiny/a": "remote", "convert:tiny/a": "pulled"}
    assert re.search(r"^pulled convert:tiny/a  \d+\.\d s  \S+/store/convert/[0-9a-f]{64}$", first.stdout, re.M)
    assert (tmp_path / "b/recipes/tiny/a/convert/model.safetensors").is_file()
    assert not (tmp_path / "b/recipes/tiny/a/fetch").exists()
    again = run_doit(project, tmp_path / "b", "convert:tiny/a")
    assert executed(again) == [] and "remote fetch:tiny/a  up to date" in again.stdout
    status = subprocess.run([sys.executable, "-m", "ane_build.cli.main", "status", "--recipes-dir", "recipes",
                             "--artifacts", str(tmp_path / "b"), "recipes/tiny/a.yaml"],
                            capture_output=True, text=True, cwd=project, check=True).stdout
    assert [line.split()[-1] for line in status.splitlines()][:3] == ["remote", "local", "missing"]
    assert outcomes(run_doit(project, tmp_path / "b", "fetch:tiny/a")) == {"fetch:tiny/a": "pulled"}


def test_doit_with_the_server_down_warns_once_and_builds(project, tmp_path):
    from tests.s3_server import S3

    env = {**S3(f"http://127.0.0.1:{free_port()}").env, "ANE_BUILD_CACHE": f"s3://{BUCKET}/x"}
    proc = run_doit(project, tmp_path / "a", "convert:tiny/a", env=env)
    assert outcomes(proc) == {"fetch:tiny/a": "built", "convert:tiny/a": "built"}
    [warning] = [line for line in proc.stderr.splitlines() if "remote cache" in line]
    assert warning.startswith("WARNING: remote cache s3://") and "rest of this run" in warning
