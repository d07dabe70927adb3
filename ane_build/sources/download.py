"""Resumable https download, published only once its sha256 matches the pinned one."""

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

from ane_build.util.errors import UserError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Applies to the connect and to every read, so a stalled server fails instead of hanging a build.
TIMEOUT_SECONDS = 30


def download(url, sha256, dest, partial_dir, ssl_context=None):
    """Fetch ``url`` into ``dest``, verified against ``sha256``.

    The bytes go to ``partial_dir/<sha256>.part`` first; a later call resumes that
    file with a Range request. ``partial_dir`` must be on dest's filesystem so the
    final rename is atomic. ``ssl_context`` defaults to the system trust store,
    which honours ``SSL_CERT_FILE``.
    """
    _require_https(url)
    sha256 = sha256.lower()
    dest = Path(dest)
    part = Path(partial_dir) / f"{sha256}.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    opener = _opener(ssl_context or ssl.create_default_context())
    with _exclusive(part.with_name(part.name + ".lock")):
        try:
            _transfer(opener, url, part, dest.name)
        except (OSError, http.client.HTTPException) as e:
            raise UserError(url, f"download failed: {_reason(e)}") from None
        _verify(url, part, sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
    log.info("downloaded %s -> %s", url, dest)


@contextlib.contextmanager
def _exclusive(lock_path):
    # Builds of different store entries can pin the same sha256 (same URL, another file
    # name), so the store's per-entry lock does not keep them off the same partial file.
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _require_https(url):
    if urllib.parse.urlsplit(url).scheme.lower() != "https":
        raise UserError(url, "only https:// URLs are allowed")


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    # A redirect must not downgrade the transfer to plain http (or to file:, ftp:).
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() != "https":
            raise UserError(req.full_url, f"redirected to non-https URL {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(context):
    return urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context), _HttpsOnlyRedirects())


def _transfer(opener, url, part, label):
    have = part.stat().st_size if part.exists() else 0
    resp, start = _open(opener, url, have)
    if resp is None:
        log.info("partial download of %s is already complete", url)
        return
    with resp:
        total = _total_size(resp, start)
        if start:
            log.info("resuming %s at byte %d", url, start)
        with open(part, "ab" if start else "wb") as f, _progress(label, start, total) as bar:
            got = start
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    # http.client returns a short body without complaint when the connection drops;
    # keep the partial file so the next run resumes it.
    if total is not None and got < total:
        raise UserError(url, f"connection closed after {got} of {total} bytes; "
                             "run again to resume")


def _open(opener, url, have):
    """(response, byte offset its body starts at), or (None, have) if nothing is left to fetch."""
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        resp = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        complete = _content_range(e.headers)[2] == have
        e.close()
        if complete:
            return None, have
        log.info("server cannot resume %s from byte %d; starting over", url, have)
        return _open(opener, url, 0)
    if not have:
        return resp, 0
    if resp.status == 206 and _content_range(resp.headers)[0] == have:
        return resp, have
    log.info("server did not resume %s from byte %d; starting over", url, have)
    if resp.status == 206:
        # A range we did not ask for: its bytes cannot be appended, so ask for everything.
        resp.close()
        return _open(opener, url, 0)
    return resp, 0


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


def _content_range(headers):
    """(first byte, last byte, complete length) from a Content-Range header; None where unknown."""
    m = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
    if not m:
        return None, None, None
    return tuple(int(g) if g and g.isdigit() else None for g in m.groups())


def _total_size(resp, start):
    if resp.status == 206:
        complete = _content_range(resp.headers)[2]
        if complete is not None:
            return complete
    length = resp.headers.get("Content-Length")
    return start + int(length) if length and length.isdigit() else None


def _progress(label, start, total):
    return tqdm(total=total, initial=start, desc=label, unit="B", unit_scale=True,
                unit_divisor=1024, file=sys.stderr, leave=False)


def _verify(url, part, expected):
    h = hashlib.sha256()
    with open(part, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    got = h.hexdigest()
    if got != expected:
        # The bytes are wrong, not merely incomplete: resuming them would never succeed.
        part.unlink()
        raise UserError(url, f"sha256 mismatch: expected {expected}, got {got}")


def _reason(e):
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__
