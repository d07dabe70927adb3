"""The remote cache: store entries shared through an fsspec URL (``file:///...``, ``s3://...``, ``gs://...``).

Under the URL, an entry is ``<stage>/<key>/manifest.json`` (the local entry's manifest, byte for
byte), and its files are ``blobs/<sha256>``, one object per content. Files are named by their
content so that two runners pushing one key at once, even with different bytes, never mix their
files: each manifest names objects its pusher uploaded (or found) before it (files first,
manifest last), so a reader never takes a half-pushed entry. And a content is stored once,
whichever entries hold it: a release bundle's ``model.pte`` is its export's, the tokenizer
travels with every stage.

The remote is never trusted. A pulled manifest must be the one asked for (its stage and key, and
key inputs that hash to that key) and name only plain relative paths; every file must have the size
and sha256 it lists. An entry that fails is refused, built locally, and not asked for again in the
run. Anything else going wrong (the remote down or slow, no credentials, no bucket) costs one
warning, and the rest of the run is local only. The location and mode never enter a stage key.
"""

import atexit
import json
import logging
import multiprocessing
import os
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

from ane_build.cache import config, keys
from ane_build.cache.filehash import sha256_file
from ane_build.cache.store import MANIFEST
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)

# Bounds on one request, so a remote that is down or stalled costs seconds, once per run.
CONNECT_TIMEOUT, READ_TIMEOUT, ATTEMPTS = 5, 10, 2
SHA256 = re.compile(r"[0-9a-f]{64}")
URL = re.compile(r"([a-z][a-z0-9+.-]*)://(.*)")


class Refused(Exception):
    """A remote entry that is not what its key promises."""


def configured(config_path):
    """The remote cache the environment or ``config_path`` names, or None."""
    url, mode, where = config.cache_settings(config_path)
    return open_remote(url, mode, where) if url else None


def open_remote(url, mode, where):
    """A Remote for ``url``, or one UserError naming ``where`` the URL was set. Connects to nothing."""
    import fsspec

    match = URL.fullmatch(url)
    if not match or not match[2].strip("/"):
        raise UserError(where, f"expected an fsspec URL such as file:///path, s3://bucket/prefix or "
                               f"gs://bucket/prefix; got {url!r}")
    protocol, rest = match.groups()
    if protocol == "file" and not rest.startswith("/"):
        raise UserError(where, f"a file:// URL takes an absolute path (file:///...); got {url!r}")
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise UserError(where, f"unknown protocol {protocol}:// in {url!r}") from None
    except ImportError as e:
        raise UserError(where, f"{protocol}:// needs a package that is not installed ({e})") from None
    return Remote(url, mode)


def _filesystem(url, timeout):
    """(fsspec filesystem, root path) with bounded timeouts and few retries where the protocol has them."""
    import fsspec

    protocol = URL.fullmatch(url)[1]
    options = {"skip_instance_cache": True}  # our own instance: its retries are set below
    if protocol in ("s3", "s3a"):
        # Every file is checked end to end by its sha256 when pulled: S3's own checksum of each
        # request would be a second one, computed here and again by the server, for nothing.
        options["config_kwargs"] = {"connect_timeout": CONNECT_TIMEOUT, "read_timeout": timeout,
                                    "retries": {"max_attempts": ATTEMPTS, "mode": "standard"},
                                    "request_checksum_calculation": "when_required",
                                    "response_checksum_validation": "when_required"}
    elif protocol in ("gs", "gcs"):
        import aiohttp

        options["session_kwargs"] = {"timeout": aiohttp.ClientTimeout(sock_connect=CONNECT_TIMEOUT, sock_read=timeout)}
    fs, root = fsspec.core.url_to_fs(url, **options)
    if protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs retries on its own 5 times with back-off: botocore's ATTEMPTS suffice
    return fs, root.rstrip("/")


class Remote:
    def __init__(self, url, mode="readwrite", timeout=READ_TIMEOUT):
        self.url, self.mode, self.timeout = url.rstrip("/"), mode, timeout
        self.fs, self.root = _filesystem(url, timeout)
        self.local = "file" in self.fs.protocol or "local" in self.fs.protocol
        self.down = False  # set at the first failure: the rest of the run is local only
        self.distrusted = set()  # (stage, key) of entries refused in this run
        self._init_runtime()

    def _init_runtime(self):
        self._lock = threading.Lock()
        self._pool, self._pool_pid, self._pending = None, None, []

    def __getstate__(self):  # doit -n sends tasks to worker processes; threads do not travel
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_pool", "_pool_pid", "_pending")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    def where(self, stage, key):
        return f"{self.url}/{stage}/{key}"

    def _path(self, stage, key, *parts):
        return "/".join((self.root, stage, key, *parts))

    def _blob(self, sha256):
        return "/".join((self.root, "blobs", sha256))

    def lookup(self, stage, key):
        """The remote entry's manifest, checked against ``key``; None if it is not there (or refused, or the remote is down)."""
        if self.down or (stage, key) in self.distrusted:
            return None
        try:
            return self._manifest(stage, key)[0]
        except FileNotFoundError:
            return None
        except Refused as e:
            self._distrust(stage, key, e)
        except Exception as e:  # any failure of the remote itself: one warning, then local only
            self._went_down(e)
        return None

    def pull(self, store, stage, key):
        """Download the entry into ``store`` through its atomic publish, every file checked: (its folder,
        whether this call put it there, not a concurrent one), or None."""
        if self.down or (stage, key) in self.distrusted:
            return None
        try:
            manifest, raw = self._manifest(stage, key)
            return store.adopt(stage, key, lambda tmp: self._fill(tmp, manifest, raw))
        except FileNotFoundError:  # no manifest: not there (a missing file is a Refused, from _fill)
            return None
        except Refused as e:
            self._distrust(stage, key, e)
        except Exception as e:
            self._went_down(e)
        return None

    def _manifest(self, stage, key):
        raw = self.fs.cat_file(self._path(stage, key, MANIFEST))
        return checked(raw, stage, key), raw

    def _fill(self, tmp, manifest, raw):
        """Write the entry's files into ``tmp`` and check each; {relative path: sha256} for the store."""
        for rel, meta in manifest["files"].items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fs.get_file(self._blob(meta["sha256"]), str(path))
            except FileNotFoundError:
                raise Refused(f"{rel} is missing") from None
            if path.stat().st_size != meta["size"] or sha256_file(path) != meta["sha256"]:
                raise Refused(f"{rel} does not match its manifest")
        (tmp / MANIFEST).write_bytes(raw)
        return {rel: meta["sha256"] for rel, meta in manifest["files"].items()}

    def push(self, store, stage, key):
        """Upload a local entry (readwrite mode): in the background of the main process, which waits
        for it before exiting; at once in a worker process (doit -n), which exits without waiting."""
        if self.mode != "readwrite" or self.down:
            return
        entry = store.entry(stage, key)
        if multiprocessing.parent_process() is not None:
            self._push(entry, stage, key)
            return
        with self._lock:
            if self._pool_pid != os.getpid():
                self._pool, self._pool_pid = ThreadPoolExecutor(1, thread_name_prefix="ane-build-push"), os.getpid()
                atexit.register(self.wait)
            self._pending.append(self._pool.submit(self._push, entry, stage, key))

    def wait(self):
        """Return once every push started in this process has ended (each reports its own failure)."""
        while self._pending:
            self._pending.pop(0).result()

    def _push(self, entry, stage, key):
        """Files first, manifest last. A manifest already there means the key was pushed (unless this
        run refused that entry: then ours replaces it)."""
        if self.down:
            return
        repair = (stage, key) in self.distrusted
        try:
            if not repair and self.fs.exists(self._path(stage, key, MANIFEST)):
                return
            raw = (entry / MANIFEST).read_bytes()
            for rel, meta in json.loads(raw)["files"].items():
                blob = self._blob(meta["sha256"])
                # One of that size is another entry's, or left by a push that was killed; after a
                # refusal any blob may be the bad one, so all go again.
                if repair or not self._holds(blob, meta["size"]):
                    self._put(lambda path: self.fs.put_file(str(entry / rel), path), blob)
            self._put(lambda path: self.fs.pipe_file(path, raw), self._path(stage, key, MANIFEST))
        except Exception as e:
            self._went_down(e)

    def _holds(self, path, size):
        try:
            return self.fs.info(path)["size"] == size
        except FileNotFoundError:
            return False

    def _put(self, write, path):
        """``write(path)``, whole or not at all: an object store's PUT is; a folder's is a rename."""
        if not self.local:
            write(path)
            return
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        write(tmp)
        self.fs.mv(tmp, path)

    def _went_down(self, error):
        with self._lock:
            if self.down:
                return
            self.down = True
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        log.warning("remote cache %s: %s; building locally for the rest of this run", self.url, reason)

    def _distrust(self, stage, key, reason):
        self.distrusted.add((stage, key))
        log.warning("remote cache %s: refused %s/%s: %s; building it locally", self.url, stage, key[:12], reason)


def checked(raw, stage, key):
    """The manifest in ``raw`` if it is the entry of ``stage`` and ``key`` and lists its files plainly; else Refused."""
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise Refused("its manifest is not JSON") from None
    if not isinstance(manifest, dict) or manifest.get("stage") != stage or manifest.get("key") != key:
        raise Refused("its manifest is for another entry")
    if keys.stage_key(manifest.get("key_inputs")) != key:
        raise Refused("its manifest's key inputs do not hash to its key")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise Refused("its manifest lists no files")
    for rel, meta in files.items():
        if not (_plain(rel) and isinstance(meta, dict) and SHA256.fullmatch(str(meta.get("sha256")))
                and type(meta.get("size")) is int and meta["size"] >= 0):
            raise Refused(f"its manifest lists {rel!r} wrongly")
    return manifest


def _plain(rel):
    """A relative path that stays inside the entry, written one way, and is not the manifest itself."""
    path = PurePosixPath(rel)
    return (rel == path.as_posix() and not path.is_absolute() and rel != MANIFEST
            and not {"..", "."} & set(path.parts) and "\\" not in rel)
