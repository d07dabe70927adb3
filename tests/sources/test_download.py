import hashlib
import os
import ssl
import threading

import pytest

from ane_build.sources.download import download
from ane_build.util.errors import UserError
from tests import https_server

BODY = os.urandom(300_000)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return https_server.make_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server(cert):
    with https_server.serve(*cert, {"/m.gguf": BODY}) as (base, state):
        yield base + "/m.gguf", state


@pytest.fixture
def trusted(cert):
    return ssl.create_default_context(cafile=str(cert[0]))


def test_downloads_and_publishes(server, trusted, tmp_path):
    url, state = server
    dest = tmp_path / "entry" / "m.gguf"
    download(url, SHA, dest, tmp_path / "partial", ssl_context=trusted)
    assert dest.read_bytes() == BODY
    assert list((tmp_path / "partial").glob("*.part")) == []
    assert state.requests == [("/m.gguf", None)]


def test_interrupted_download_resumes_with_range(server, trusted, tmp_path):
    url, state = server
    dest, partial = tmp_path / "m.gguf", tmp_path / "partial"
    state.cut_after = 100_000
    with pytest.raises(UserError, match="connection closed after 100000 of 300000 bytes"):
        download(url, SHA, dest, partial, ssl_context=trusted)
    assert not dest.exists()
    assert (partial / f"{SHA}.part").stat().st_size == 100_000

    state.cut_after = None
    download(url, SHA, dest, partial, ssl_context=trusted)
    assert state.requests[-1] == ("/m.gguf", "bytes=100000-")
    assert dest.read_bytes() == BODY


def test_server_ignoring_range_restarts_from_zero(server, trusted, tmp_path):
    url, state = server
    state.honour_range = False
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / f"{SHA}.part").write_bytes(b"stale bytes from elsewhere")
    download(url, SHA, tmp_path / "m.gguf", partial, ssl_context=trusted)
    assert state.requests == [("/m.gguf", "bytes=26-")]
    assert (tmp_path / "m.gguf").read_bytes() == BODY


def test_complete_partial_is_published_without_refetching(server, trusted, tmp_path):
    url, state = server
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / f"{SHA}.part").write_bytes(BODY)  # killed between the last byte and the rename
    download(url, SHA, tmp_path / "m.gguf", partial, ssl_context=trusted)
    assert state.requests == [("/m.gguf", f"bytes={len(BODY)}-")]
    assert (tmp_path / "m.gguf").read_bytes() == BODY


def test_oversized_partial_restarts_from_zero(server, trusted, tmp_path):
    url, state = server
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / f"{SHA}.part").write_bytes(BODY + b"junk")
    download(url, SHA, tmp_path / "m.gguf", partial, ssl_context=trusted)
    assert [rng for _, rng in state.requests] == [f"bytes={len(BODY) + 4}-", None]
    assert (tmp_path / "m.gguf").read_bytes() == BODY


def test_https_redirect_keeps_the_range(server, trusted, tmp_path):
    url, state = server
    state.redirects["/moved"] = url
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / f"{SHA}.part").write_bytes(BODY[:1000])
    download(url.replace("m.gguf", "moved"), SHA, tmp_path / "m.gguf", partial,
             ssl_context=trusted)
    assert state.requests == [("/moved", "bytes=1000-"), ("/m.gguf", "bytes=1000-")]
    assert (tmp_path / "m.gguf").read_bytes() == BODY


def test_redirect_to_plain_http_is_refused(server, trusted, tmp_path):
    url, state = server
    state.redirects["/m.gguf"] = "http://127.0.0.1:9/m.gguf"
    with pytest.raises(UserError, match=f"^{url}: redirected to non-https URL http://"):
        download(url, SHA, tmp_path / "m.gguf", tmp_path / "partial", ssl_context=trusted)
    assert state.requests == [("/m.gguf", None)]


def test_hash_mismatch_publishes_nothing(server, trusted, tmp_path):
    url, _ = server
    wrong = "0" * 64
    dest, partial = tmp_path / "m.gguf", tmp_path / "partial"
    with pytest.raises(UserError) as e:
        download(url, wrong, dest, partial, ssl_context=trusted)
    assert str(e.value) == f"{url}: sha256 mismatch: expected {wrong}, got {SHA}"
    assert not dest.exists()
    assert list(partial.glob("*.part")) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1/m.gguf", "ftp://example.org/m.gguf",
                                 "file:///etc/passwd"])
def test_only_https_is_allowed(url, tmp_path):
    with pytest.raises(UserError, match=f"^{url}: only https://"):
        download(url, SHA, tmp_path / "m.gguf", tmp_path / "partial")
    assert not (tmp_path / "m.gguf").exists()


def test_http_error_is_one_line_naming_the_url(server, trusted, tmp_path):
    url, _ = server
    missing = url.replace("m.gguf", "nope.gguf")
    with pytest.raises(UserError) as e:
        download(missing, SHA, tmp_path / "m.gguf", tmp_path / "partial", ssl_context=trusted)
    assert str(e.value) == f"{missing}: download failed: HTTP 404 Not Found"


def test_untrusted_certificate_is_refused(server, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    with pytest.raises(UserError, match=r"download failed: .*CERTIFICATE_VERIFY_FAILED") as e:
        download(url, SHA, tmp_path / "m.gguf", tmp_path / "partial")
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(url)


def test_ssl_cert_file_is_honoured(server, cert, tmp_path, monkeypatch):
    url, _ = server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))
    download(url, SHA, tmp_path / "m.gguf", tmp_path / "partial")
    assert (tmp_path / "m.gguf").read_bytes() == BODY


def test_concurrent_downloads_of_one_sha256_take_turns(server, trusted, tmp_path):
    url, state = server
    partial = tmp_path / "partial"
    errors = []

    def fetch_to(name):
        try:
            download(url, SHA, tmp_path / name, partial, ssl_context=trusted)
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=fetch_to, args=(n,)) for n in ("a.gguf", "b.gguf")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert errors == []
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes() == BODY
