"""sha256 of files, memoised by (path, size, mtime) so big inputs are hashed once.

The memo is a JSON file beside the store. It is only a cache: losing it, or two
builds racing to write it, costs a rehash, never a wrong answer, because an
entry is reused only while the file's size and mtime (ns) are unchanged.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

CHUNK = 1 << 20


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FileHasher:
    def __init__(self, memo_path):
        self.memo_path = Path(memo_path)
        self._memo = self._load()
        self._dirty = False

    def _load(self):
        try:
            return json.loads(self.memo_path.read_text())
        except (OSError, ValueError):
            return {}

    def __call__(self, path):
        path = Path(path).resolve()
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns]
        cached = self._memo.get(str(path))
        if cached and cached[:2] == stamp:
            return cached[2]
        digest = sha256_file(path)
        self._memo[str(path)] = [*stamp, digest]
        self._dirty = True
        return digest

    def remember(self, path, digest):
        """Record a digest computed elsewhere (e.g. while a file was written)."""
        st = Path(path).stat()
        self._memo[str(Path(path).resolve())] = [st.st_size, st.st_mtime_ns, digest]
        self._dirty = True

    def forget(self, prefix):
        """Drop memo entries under ``prefix`` (a folder about to be deleted)."""
        prefix = str(Path(prefix).resolve())
        for key in [k for k in self._memo if k == prefix or k.startswith(prefix + os.sep)]:
            del self._memo[key]
            self._dirty = True

    def save(self):
        if not self._dirty:
            return
        self.memo_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.memo_path.parent, prefix=".filehash-")
        with os.fdopen(fd, "w") as f:
            json.dump(self._memo, f)
        os.replace(tmp, self.memo_path)
        self._dirty = False
