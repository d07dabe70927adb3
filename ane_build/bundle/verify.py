"""``ane-build verify <bundle folder or .tar.gz>``: does a release bundle hold exactly what its
``manifest.json`` lists?

Every listed file must be there with its size and sha256, and a file present but not listed is a
problem too: a bundle ships whole. Its README.md must be the one its manifest renders
(``bundle_readme``): a README edited, or copied from another build, would tell an app
developer wrong numbers. A ``.tar.gz`` is unpacked into a temporary folder and checked
the same way; an archive with a member that is not a plain file or folder, or whose path leaves
the archive (absolute, or through ".."), is refused before anything is unpacked.
"""

import gzip
import json
import logging
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from ane_build.bundle import readme as bundle_readme
from ane_build.bundle.readme import README
from ane_build.cache.filehash import CHUNK, sha256_file
from ane_build.util import command
from ane_build.util.errors import UserError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
ARCHIVE_SUFFIX = ".tar.gz"


def describe(path):
    """A file as a bundle manifest lists it."""
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size}


def verify(bundle):
    """The problems with ``bundle`` (a bundle folder or its .tar.gz), one line each; [] when intact."""
    return check(bundle)[1]


def check(bundle):
    """(how many listed files were checked, the problems)."""
    path = Path(bundle)
    if path.is_dir():
        return check_folder(path)
    if path.is_file() and path.name.endswith(ARCHIVE_SUFFIX):
        return check_archive(path)
    found = "another kind of file" if path.exists() else "nothing"
    return 0, [f"expected a bundle folder or a {ARCHIVE_SUFFIX} file; found {found}"]


def check_folder(folder):
    manifest, problem = read_manifest(folder / MANIFEST)
    if problem:
        return 0, [problem]
    listed = manifest["files"]
    problems = [p for rel, meta in sorted(listed.items()) if (p := check_file(folder, rel, meta))]
    # The bundle's own archive sits beside the files it packs (a release folder holds both).
    own_archive = folder.resolve().name + ARCHIVE_SUFFIX
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()} - {MANIFEST, own_archive}
    problems += [f"{rel}: present but not listed in {MANIFEST}" for rel in sorted(present - set(listed))]
    if not problems:
        problems = [p for p in [check_readme(folder, manifest)] if p]
    return len(listed), problems


def read_manifest(path):
    """(the manifest, None) when it lists {relative path: {"sha256", "size"}}, else (None, the problem)."""
    try:
        manifest = json.loads(path.read_text())
        if all(isinstance(m["sha256"], str) and isinstance(m["size"], int) for m in manifest["files"].values()):
            return manifest, None
    except FileNotFoundError:
        return None, f"{MANIFEST}: missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None, f"{MANIFEST}: not a bundle manifest (expected \"files\": {{path: {{sha256, size}}}})"


def check_readme(folder, manifest):
    """The problem with the bundle's README, or None: it must be the one its manifest renders.
    Checked once every file matches the manifest, so it reads a file the manifest vouches for."""
    if README not in manifest["files"]:
        return f"{README}: not listed in {MANIFEST} (a bundle carries its README)"
    try:
        expected = bundle_readme.render(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return f"{MANIFEST}: lacks what {README} is rendered from ({type(e).__name__}: {e})"
    if (folder / README).read_text(encoding="utf-8", errors="replace") != expected:
        return f"{README}: not the one {MANIFEST} renders (edited, or from another build)"
    return None


def check_file(folder, rel, meta):
    """The problem with one listed file, or None."""
    if not stays_inside(rel):
        return f"{rel}: listed with a path that leaves the bundle"
    path = folder / rel
    if not path.is_file():
        return f"{rel}: missing"
    size = path.stat().st_size
    if size != meta["size"]:
        return f"{rel}: {size} bytes; {MANIFEST} says {meta['size']}"
    digest = sha256_file(path)
    if digest != meta["sha256"]:
        return f"{rel}: sha256 {digest}; {MANIFEST} says {meta['sha256']}"
    return None


def stays_inside(name):
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def check_archive(archive):
    """The archive holds one folder, the bundle (as release writes it): checked once unpacked."""
    with tempfile.TemporaryDirectory(prefix="ane-build-verify-") as scratch:
        problems = unpack(archive, Path(scratch))
        if problems:
            return 0, problems
        tops = sorted(Path(scratch).iterdir())
        if len(tops) != 1 or not tops[0].is_dir():
            return 0, [f"expected one top folder (the bundle); found {', '.join(p.name for p in tops) or 'nothing'}"]
        return check_folder(tops[0])


def unpack(archive, dest):
    """Unpack ``archive`` into ``dest`` unless a member is refused; the problems."""
    try:
        with gzip.open(archive, "rb") as gz, tarfile.open(fileobj=gz, mode="r:") as tar:
            members = tar.getmembers()
            refused = [f"{m.name}: refused: {why}" for m in members if (why := refusal(m))]
            if refused:
                return refused
            # The "data" filter re-checks what refusal() did, inside tarfile itself.
            tar.extractall(dest, filter="data")
            # tarfile stops reading at the end of the archive; reading on checks gzip's CRC and length.
            while gz.read(CHUNK):
                pass
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        return [f"not a readable {ARCHIVE_SUFFIX} ({e})"]
    return []


def refusal(member):
    if not (member.isfile() or member.isdir()):
        return "not a plain file or folder"
    if not stays_inside(member.name):
        return "its path leaves the archive"
    return None


def add_arguments(parser):
    parser.add_argument("bundle", help=f"a release bundle: its folder, or its {ARCHIVE_SUFFIX}")
    return parser


def main(args):
    """Print "ok: N files verified", or raise UserError naming the first problem and the count."""
    n_files, problems = check(args.bundle)
    if problems:
        for problem in problems[1:]:
            log.warning("%s: %s", args.bundle, problem)
        count = f"{len(problems)} problems" if len(problems) > 1 else "1 problem"
        raise UserError(args.bundle, f"{problems[0]} ({count})")
    print(f"ok: {n_files} files verified")
    return 0


def entry(argv=None):
    return command.run("python -m ane_build.bundle.verify", __doc__, add_arguments, main, argv)


if __name__ == "__main__":
    sys.exit(entry())
