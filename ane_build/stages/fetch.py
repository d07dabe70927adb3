"""fetch: the recipe's source (local path, file inside an installed package, pinned https URL,
Hugging Face Hub repo at a commit) -> a copy in the store.

The entry holds ``source/<name>``: the fetched file, or the fetched folder's contents
under ``source/<foldername>/`` (a Hub repo's files under ``source/<repo name>/``).
"""

import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import stat
import time
import urllib.parse
from pathlib import Path

from ane_build.sources import hub
from ane_build.sources.download import download
from ane_build.util.errors import SourceMissing, UserError

log = logging.getLogger(__name__)


def run(inputs, params, out_dir):
    """params: the recipe's ``source`` mapping, validated, paths absolute. No inputs.

    A Hub source's revision should be the commit its key was planned with (``key_params``):
    a branch is resolved again here, and may have moved.
    """
    dest = Path(out_dir) / "source" / source_name(params)
    dest.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    extra = {}
    if "url" in params:
        kind = "url"
        # Beside the store's entries, not inside out_dir: a killed build's temporary entry
        # is thrown away, but its partial download must survive for the next build to resume.
        partial_dir = Path(out_dir).parent / "partial"
        download(params["url"], params["sha256"], dest, partial_dir)
    elif "hf" in params:
        kind = "hf"
        extra["commit"] = hub.commit(params["hf"], params["revision"])
        hub.download(params["hf"], extra["commit"], params.get("files"), dest)
    else:
        kind = "package" if "package" in params else "path"
        src = locate(params)
        log.info("copying %s", src)
        _copy(src, dest, _where(params))
    return {"kind": kind, **extra, "bytes": _tree_size(dest.parent),
            "seconds": round(time.monotonic() - start, 3)}


def key_params(params, file_sha256):
    """What the fetch key hashes: what the source holds, never where it lives (no path, no host,
    no token). A Hub source holds its repo at a commit (git names a commit by its content),
    narrowed by its globs; a branch or tag is resolved to its commit here, when planning."""
    if "hf" in params:
        files = params.get("files")
        return {"hf": params["hf"], "commit": hub.commit(params["hf"], params["revision"]),
                "files": sorted(set(files)) if files else None}
    return {"content": digest(params, file_sha256), "name": source_name(params)}


def source_name(params):
    """The name the source gets under ``source/`` in the entry."""
    if "url" in params:
        return _url_file_name(params)
    if "hf" in params:
        return params["hf"].split("/")[1]
    return locate(params).name


def locate(params):
    """The local file or folder a path or package source names, checked readable: a regular file
    (or, for ``source.path``, a folder; its entries are checked as ``_tree_files`` walks it).
    Anything else (a dangling link, a symlink loop, a FIFO, a device, a file or folder this user
    may not read) is a UserError naming the path; nothing there at all is SourceMissing."""
    if "path" in params:
        path = Path(params["path"])
        if _lstat(path, "source.path") is None:
            raise SourceMissing("source.path", path)
        return _checked(path, "source.path", folder_ok=True)
    return _checked(_package_file(params["package"], params["file"]), "source.file", folder_ok=False)


def digest(params, file_sha256):
    """The content identity of a local or url source, for the stage key (no paths, no names at the top)."""
    if "url" in params:
        return params["sha256"].lower()
    src = locate(params)
    if src.is_file():
        return file_sha256(src)
    pairs = sorted((f.relative_to(src).as_posix(), file_sha256(f)) for f in _tree_files(src, _where(params)))
    return _sha256_text(json.dumps(pairs))


def _package_file(package, file):
    top, *sub = package.split(".")
    # find_spec on a top-level name reads the import system's metadata without running
    # the package: a model-data package need not be importable (or cheap to import).
    spec = importlib.util.find_spec(top)
    if spec is None:
        hint = f" (use the import name, e.g. '{top.replace('-', '_')}')" if "-" in top else ""
        raise UserError("source.package", f"no installed package named '{package}'{hint}")
    if not spec.submodule_search_locations:
        raise UserError("source.package", f"'{top}' is a module ({spec.origin}), not a package")
    roots = [Path(loc).joinpath(*sub) for loc in spec.submodule_search_locations]
    for root in roots:
        if _lstat(root / file, "source.file") is not None:
            return root / file  # there, if perhaps unreadable: locate says how
    where = ", ".join(str(r) for r in roots)
    raise UserError("source.file", f"'{file}' not found in package {package} (at {where})")


def _url_file_name(params):
    name = params.get("file") or Path(urllib.parse.unquote(
        urllib.parse.urlsplit(params["url"]).path)).name
    if not name or name in (".", "..") or Path(name).name != name:
        raise UserError("source.file", f"expected a plain file name for the download, got '{name}'")
    return name


def _copy(src, dest, where):
    # A copy, never a link: the entry must not change when the user's file does. A folder's copy
    # holds the files its digest hashed, as the walk found (and checked) them.
    if src.is_dir():
        dest.mkdir()
        for f in _tree_files(src, where):
            out = dest / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
    else:
        shutil.copyfile(src, dest)


def _where(params):
    """The recipe key naming a local source."""
    return "source.path" if "path" in params else "source.file"


def _tree_files(folder, where="source.path"):
    """Every file under ``folder``, in a stable order; symlinks followed as the copy follows them.

    An entry that is not a readable regular file or folder (a dangling link, a symlink loop, a
    link back to a folder above it, a FIFO, a device, a socket, no permission) is a UserError."""
    found = []

    def visit(path, above):
        try:
            with os.scandir(path) as it:
                names = sorted(entry.name for entry in it)
        except OSError as e:
            raise _unreadable(where, path, e) from None
        for name in names:
            entry = path / name
            st = _stat(entry, where)
            if stat.S_ISDIR(st.st_mode):
                seen = above.get((st.st_dev, st.st_ino))
                if seen is not None:
                    raise UserError(where, f"{entry} is a symlink loop: it leads back to {seen}")
                visit(entry, {**above, (st.st_dev, st.st_ino): entry})
            elif stat.S_ISREG(st.st_mode):
                _check_opens(entry, where)
                found.append(entry)
            else:
                raise UserError(where, f"{entry} is {_kind(st)}; expected only files and folders "
                                       f"in {folder}")

    top = _stat(Path(folder), where)
    visit(Path(folder), {(top.st_dev, top.st_ino): Path(folder)})
    return found


def _checked(path, where, folder_ok):
    """``path`` if it is a regular file this user can open, or (``folder_ok``) a folder."""
    st = _stat(path, where)
    if stat.S_ISDIR(st.st_mode):
        if not folder_ok:
            raise UserError(where, f"{path} is a folder; expected a file")
    elif stat.S_ISREG(st.st_mode):
        _check_opens(path, where)
    else:
        raise UserError(where, f"{path} is {_kind(st)}; expected a file{' or a folder' if folder_ok else ''}")
    return path


def _lstat(path, where):
    """``os.lstat(path)``, or None when nothing is there (no file, no link); a UserError when
    the path cannot be looked at (a folder on the way this user may not enter, a symlink loop)."""
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise _unreadable(where, path, e) from None


def _stat(path, where):
    """``os.stat(path)``, links followed; a UserError naming the path when that fails."""
    try:
        return os.stat(path)
    except OSError as e:
        raise _unreadable(where, path, e) from None


def _check_opens(path, where):
    # Opened, never read: O_NONBLOCK so that a file swapped for a FIFO since its stat cannot hang.
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
    except OSError as e:
        raise _unreadable(where, path, e) from None


def _unreadable(where, path, e):
    """The UserError for ``path``, which ``e`` (an OSError) says cannot be reached or read."""
    if e.errno == errno.ELOOP:
        what = "is a symlink loop"
    elif e.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
        what = f"is a dangling link to {os.readlink(path)}"
    elif e.errno in (errno.EACCES, errno.EPERM):
        what = "cannot be read: permission denied"
    else:
        what = f"cannot be read: {e.strerror or e}"
    return UserError(where, f"{path} {what}")


def _kind(st):
    """What a non-regular, non-folder file is, for a message."""
    for test, kind in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(st.st_mode):
            return kind
    return "not a regular file"


def _tree_size(folder):
    return sum(f.stat().st_size for f in _tree_files(folder))


def _sha256_text(text):
    return hashlib.sha256(text.encode()).hexdigest()
