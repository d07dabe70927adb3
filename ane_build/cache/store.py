"""The content-addressed store: ``<root>/store/<stage>/<key>/`` with a ``manifest.json``.

An entry is built in a temporary folder beside its final place and renamed into
place only when complete, under a per-key lock, so a killed or concurrent build
never leaves a half-entry that counts as built. An entry whose files no longer
match its manifest counts as absent and is rebuilt. An entry pulled from a remote cache
(``adopt``) is published the same way.
"""

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ane_build.cache.filehash import FileHasher, sha256_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


class Store:
    def __init__(self, root):
        self.root = Path(root)
        self.hasher = FileHasher(self.root / "store" / ".filehash.json")

    def entry(self, stage, key):
        return self.root / "store" / stage / key

    def manifest(self, stage, key):
        try:
            return json.loads((self.entry(stage, key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def is_valid(self, stage, key):
        """True when the entry exists and every file matches its manifest's size and sha256."""
        manifest = self.manifest(stage, key)
        if manifest is None or manifest.get("key") != key:
            return False
        entry = self.entry(stage, key)
        for rel, meta in manifest["files"].items():
            path = entry / rel
            try:
                if path.stat().st_size != meta["size"] or self.hasher(path) != meta["sha256"]:
                    log.warning("store entry %s/%s: %s does not match its manifest", stage, key[:12], rel)
                    return False
            except OSError:
                log.warning("store entry %s/%s: %s is missing", stage, key[:12], rel)
                return False
        return True

    def build(self, stage, key, key_inputs, produce):
        """Return (entry dir, built?) for ``key``; run ``produce(tmp_dir)`` only if no valid entry exists.

        ``produce`` writes the stage's files into the empty folder it is given and may
        return a dict of metrics, kept in the manifest.
        """
        if self.is_valid(stage, key):
            return self.entry(stage, key), False
        with self._lock(stage, key):
            if self.is_valid(stage, key):  # a concurrent build finished it while we waited
                return self.entry(stage, key), False
            self._discard(stage, key)
            entry = self._publish(stage, key, key_inputs, produce)
        self.hasher.save()
        return entry, True

    def adopt(self, stage, key, fill):
        """Publish an entry made elsewhere (a remote cache's) through the same atomic rename as a build.

        ``fill(tmp_dir)`` writes the entry's files and its manifest.json, checks them (raising if
        they are wrong: nothing is published) and returns {relative path: sha256}. Return
        (entry dir, adopted?): False when a valid entry was already there and ``fill`` was not called.
        """
        if self.is_valid(stage, key):
            return self.entry(stage, key), False
        with self._lock(stage, key):
            if self.is_valid(stage, key):
                return self.entry(stage, key), False
            self._discard(stage, key)
            tmp = self._tmp(stage, key)
            entry = self._commit(stage, key, tmp, self._filled(tmp, fill))
        self.hasher.save()
        return entry, True

    def remove(self, stage, key):
        with self._lock(stage, key):
            self._discard(stage, key)
        self.hasher.save()

    @contextmanager
    def _lock(self, stage, key):
        lock_dir = self.root / "store" / stage / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / f"{key}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _discard(self, stage, key):
        """Remove an invalid entry and leftovers of killed builds of this key (caller holds the lock)."""
        stage_dir = self.root / "store" / stage
        doomed = [p for p in stage_dir.glob(f".tmp-{key}-*")]
        if self.entry(stage, key).exists():
            trash = stage_dir / f".trash-{key}-{os.getpid()}"
            os.rename(self.entry(stage, key), trash)
            doomed.append(trash)
        for path in doomed:
            self.hasher.forget(path)
            shutil.rmtree(path, ignore_errors=True)
        self.hasher.forget(self.entry(stage, key))

    def _publish(self, stage, key, key_inputs, produce):
        tmp = self._tmp(stage, key)
        started = time.time()
        metrics = self._filled(tmp, produce) or {}
        files = {}
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[path.relative_to(tmp).as_posix()] = {"sha256": sha256_file(path), "size": path.stat().st_size}
        manifest = {
            "stage": stage, "key": key, "key_inputs": key_inputs, "files": files,
            "seconds": round(time.time() - started, 3), "metrics": metrics,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        entry = self._commit(stage, key, tmp, {rel: meta["sha256"] for rel, meta in files.items()})
        log.debug("published %s/%s in %.1fs", stage, key[:12], manifest["seconds"])
        return entry

    def _tmp(self, stage, key):
        return Path(tempfile.mkdtemp(dir=self.root / "store" / stage, prefix=f".tmp-{key}-"))

    @staticmethod
    def _filled(tmp, fill):
        try:
            return fill(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a SIGKILL skips this; _discard sweeps those
            raise

    def _commit(self, stage, key, tmp, digests):
        entry = self.entry(stage, key)
        os.rename(tmp, entry)  # the commit point: before this, nothing counts as built
        for rel, digest in digests.items():
            self.hasher.remember(entry / rel, digest)
        return entry

    def view(self, recipe_name, stage):
        """``<root>/recipes/<recipe>/<stage>``: where a recipe shows its stage's entry."""
        return self.root / "recipes" / recipe_name / stage

    def link_view(self, recipe_name, stage, key):
        """Point the recipe's ``view`` of ``stage`` at the entry."""
        self.link(self.view(recipe_name, stage), self.entry(stage, key))

    def link(self, link, target):
        """Make ``link`` a relative symlink to ``target``, replacing what was there atomically."""
        target = os.path.relpath(target, link.parent)
        if link.is_symlink() and os.readlink(link) == target:
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        tmp = link.with_name(f".{link.name}.{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)
