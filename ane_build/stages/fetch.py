"""fetch: the recipe's source (local path, file inside an installed package, pinned https URL,
Hugging Face Hub repo at a commit) -> a copy in the store.

The entry holds ``source/<name>``: the fetched file, or the fetched folder's contents
under ``source/<foldername>/`` (a Hub repo's files under ``source/<repo name>/``).
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import urllib.parse
from pathlib import Path

from ane_build import hub
from ane_build.download import download
from ane_build.errors import UserError

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
        _copy(src, dest)
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
    """The local file or folder a path or package source names."""
    if "path" in params:
        path = Path(params["path"])
        if not path.exists():
            raise UserError("source.path", f"{path} does not exist")
        return path
    return _package_file(params["package"], params["file"])


def digest(params, file_sha256):
    """The content identity of a local or url source, for the stage key (no paths, no names at the top)."""
    if "url" in params:
        return params["sha256"].lower()
    src = locate(params)
    if src.is_file():
        return file_sha256(src)
    pairs = sorted((f.relative_to(src).as_posix(), file_sha256(f)) for f in _tree_files(src))
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
        if (root / file).exists():
            return root / file
    where = ", ".join(str(r) for r in roots)
    raise UserError("source.file", f"'{file}' not found in package {package} (at {where})")


def _url_file_name(params):
    name = params.get("file") or Path(urllib.parse.unquote(
        urllib.parse.urlsplit(params["url"]).path)).name
    if not name or name in (".", "..") or Path(name).name != name:
        raise UserError("source.file", f"expected a plain file name for the download, got '{name}'")
    return name


def _copy(src, dest):
    # A copy, never a link: the entry must not change when the user's file does.
    if src.is_dir():
        shutil.copytree(src, dest, copy_function=shutil.copyfile)
    else:
        shutil.copyfile(src, dest)


def _tree_files(folder):
    """Every file under ``folder``, in a stable order; symlinks followed as the copy follows them."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(Path(dirpath, name) for name in sorted(filenames))
    return [f for f in found if f.is_file()]


def _tree_size(folder):
    return sum(f.stat().st_size for f in _tree_files(folder))


def _sha256_text(text):
    return hashlib.sha256(text.encode()).hexdigest()
