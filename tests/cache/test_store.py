import json
import multiprocessing
import os

import pytest

from ane_build.cache.store import Store


def produce_files(out):
    (out / "a.bin").write_bytes(b"x" * 100)
    (out / "sub").mkdir()
    (out / "sub" / "b.txt").write_text("hello")
    return {"n": 2}


def test_build_publishes_entry_with_manifest(tmp_path):
    store = Store(tmp_path)
    entry, built = store.build("s", "k1", {"stage": "s"}, produce_files)
    assert built and entry == tmp_path / "store/s/k1"
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["files"]["sub/b.txt"]["size"] == 5 and manifest["metrics"] == {"n": 2}
    assert manifest["key_inputs"] == {"stage": "s"}
    assert store.is_valid("s", "k1")


def test_second_build_reuses_the_entry(tmp_path):
    store = Store(tmp_path)
    store.build("s", "k1", {}, produce_files)
    calls = []
    entry, built = store.build("s", "k1", {}, lambda out: calls.append(out))
    assert not built and calls == []


def test_corrupted_file_makes_the_entry_absent_and_it_is_rebuilt(tmp_path):
    store = Store(tmp_path)
    entry, _ = store.build("s", "k1", {}, produce_files)
    (entry / "a.bin").write_bytes(b"y" * 100)  # same size, other content
    assert not Store(tmp_path).is_valid("s", "k1")
    _, built = Store(tmp_path).build("s", "k1", {}, produce_files)
    assert built and (entry / "a.bin").read_bytes() == b"x" * 100


def test_missing_file_makes_the_entry_absent(tmp_path):
    store = Store(tmp_path)
    entry, _ = store.build("s", "k1", {}, produce_files)
    (entry / "sub" / "b.txt").unlink()
    assert not store.is_valid("s", "k1")


def test_failed_build_leaves_nothing(tmp_path):
    store = Store(tmp_path)

    def boom(out):
        (out / "half").write_text("partial")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        store.build("s", "k1", {}, boom)
    assert not store.entry("s", "k1").exists()
    assert [p.name for p in (tmp_path / "store/s").iterdir()] == [".locks"]


def test_leftover_of_a_killed_build_is_swept_and_never_counts(tmp_path):
    store = Store(tmp_path)
    stale = tmp_path / "store/s/.tmp-k1-dead"
    stale.mkdir(parents=True)
    (stale / "a.bin").write_text("half")
    assert not store.is_valid("s", "k1")
    store.build("s", "k1", {}, produce_files)
    assert not stale.exists()


def _build_in_process(root, log_path):
    def produce(out):
        with open(log_path, "a") as f:
            f.write("built\n")
        produce_files(out)
    Store(root).build("s", "k1", {}, produce)


def test_concurrent_builds_of_one_key_build_once(tmp_path):
    log_path = tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_in_process, args=(tmp_path, log_path)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert log_path.read_text() == "built\n"


def test_link_view_points_at_the_entry(tmp_path):
    store = Store(tmp_path)
    entry, _ = store.build("s", "k1", {}, produce_files)
    store.link_view("fam/dev", "s", "k1")
    link = tmp_path / "recipes/fam/dev/s"
    assert link.is_symlink() and link.resolve() == entry.resolve()
    assert not os.path.isabs(os.readlink(link))


def test_remove(tmp_path):
    store = Store(tmp_path)
    store.build("s", "k1", {}, produce_files)
    store.remove("s", "k1")
    assert not store.entry("s", "k1").exists() and not store.is_valid("s", "k1")
