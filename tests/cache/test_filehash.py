import os

from ane_build.cache.filehash import FileHasher, sha256_file


def test_memo_rehashes_only_when_size_or_mtime_changes(tmp_path, monkeypatch):
    f = tmp_path / "big.bin"
    f.write_bytes(b"a" * 1000)
    hasher = FileHasher(tmp_path / "memo.json")
    first = hasher(f)
    hasher.save()
    calls = []
    monkeypatch.setattr("ane_build.cache.filehash.sha256_file", lambda p: calls.append(p) or "x")
    again = FileHasher(tmp_path / "memo.json")
    assert again(f) == first and calls == []
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(1, 1))
    assert again(f) == "x" and len(calls) == 1


def test_sha256_file(tmp_path):
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert sha256_file(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
