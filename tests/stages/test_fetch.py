import hashlib
import os
import shutil
import sys

import pytest

from ane_build.errors import UserError
from ane_build.stages import fetch
from tests import https_server

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
