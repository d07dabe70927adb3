"""The native runner's sources, as a release bundle carries them in its ``runner/`` folder.

An app builds the runner into itself (the bundle README's "Run it" section), so a bundle carries
the sources of the runner its README describes: ``CMakeLists.txt``, ``README.md`` and
``cmake/``, ``include/``, ``src/``, ``tools/``; not ``build/`` (a host's build), ``python/`` (the
tests' ctypes binding) or dotfiles (``.gitignore``). They are read from ``runner/`` beside the
package, which an editable install from a clone (the README's) has.

They are not Python, so the import graph does not key them: their digest (``sha256``) enters the
release stage's key (``pipeline.key_params``), and an edit to one rebuilds the release alone.
"""

import hashlib
import shutil
from pathlib import Path

import ane_build
from ane_build.cache.filehash import sha256_file
from ane_build.util.errors import UserError, display_path

FOLDER = "runner"  # beside the package, and in the bundle
ROOT = Path(ane_build.__file__).resolve().parents[1] / FOLDER
FILES = ("CMakeLists.txt", "README.md")
FOLDERS = ("cmake", "include", "src", "tools")


def files(root=None):
    """{path relative to the runner folder, in POSIX form: file}, sorted by path; a UserError naming
    what is missing when ``root`` (default ``ROOT``) lacks one of ``FILES`` or ``FOLDERS``."""
    root = Path(root or ROOT)
    missing = [name for name in FILES if not (root / name).is_file()]
    missing += [f"{name}/" for name in FOLDERS if not (root / name).is_dir()]
    if missing:
        raise UserError(display_path(root), f"missing {', '.join(missing)}: a release bundle carries the native "
                        "runner's sources, read from runner/ beside the ane_build package; install ane-build "
                        "from a clone of its repository (pip install -e .), not from a wheel or sdist")
    found = {name: root / name for name in FILES}
    for folder in FOLDERS:
        for path in (root / folder).rglob("*"):
            rel = path.relative_to(root)
            if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                found[rel.as_posix()] = path
    return dict(sorted(found.items()))


def sha256(root=None):
    """The sources' digest: the sha256 of their ``sha256sum`` listing (``<sha256>  <path>`` lines,
    sorted by path), so a renamed file changes it too. None where they are missing: the release
    stage then fails on ``files`` naming what, and every other stage still plans."""
    try:
        listing = "".join(f"{sha256_file(path)}  {rel}\n" for rel, path in files(root).items())
    except UserError:
        return None
    return hashlib.sha256(listing.encode()).hexdigest()


def copy(bundle, root=None):
    """Copy the sources into ``bundle``/runner/ (contents only: no times or modes); their paths there."""
    copied = []
    for rel, path in files(root).items():
        dest = Path(bundle) / FOLDER / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        copied.append(f"{FOLDER}/{rel}")
    return copied
