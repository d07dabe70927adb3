import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile

import pytest

from ane_build.bundle import runner_sources, verify
from ane_build.stages import release
from ane_build.util.errors import UserError
from tests.stages.tiny_export import bundle


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    return bundle(tmp_path_factory)


@pytest.fixture
def copy(fresh, tmp_path):
    """A copy of the bundle folder to tamper with."""
    return shutil.copytree(fresh, tmp_path / fresh.name)


def archive_of(folder):
    """``folder`` archived as the release stage archives a bundle."""
    return release.write_archive(folder, folder.with_name(folder.name + ".tar.gz"))


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(data)


def run_main(bundle):
    return verify.main(argparse.Namespace(bundle=str(bundle)))


def test_a_fresh_bundle_and_its_archive_verify(fresh, capsys):
    for target in (fresh, fresh / f"{fresh.name}.tar.gz"):  # the release folder holds its archive
        assert verify.verify(target) == []
        assert run_main(target) == 0
        # README.md, delegation.txt, model.pte, params.json, smoke.md, tokenizer.model, and runner/'s sources
        assert capsys.readouterr().out == f"ok: {6 + len(runner_sources.files())} files verified\n"


def rewrite_readme(bundle, text):
    """A README replaced and the manifest's sha256 and size of it updated to match."""
    (bundle / "README.md").write_text(text)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["README.md"] = verify.describe(bundle / "README.md")
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def unlist_readme(bundle):
    (bundle / "README.md").unlink()
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["README.md"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def drop_from_manifest(bundle, key):
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest[key]
    (bundle / "manifest.json").write_text(json.dumps(manifest))


TAMPERING = {  # case -> (what is done to the bundle folder, how the one problem starts)
    "manifest without what the readme says": (lambda b: drop_from_manifest(b, "runner_metadata"),
                                              "manifest.json: lacks what README.md is rendered from (KeyError"),
    "readme edited": (lambda b: rewrite_readme(b, (b / "README.md").read_text().replace("1.000", "0.999")),
                      "README.md: not the one manifest.json renders"),
    "no readme": (unlist_readme, "README.md: not listed in manifest.json"),
    "changed": (lambda b: flip_a_byte(b / "model.pte"), "model.pte: sha256 "),
    "truncated": (lambda b: (b / "tokenizer.model").write_bytes(b"tok"),
                  "tokenizer.model: 3 bytes; manifest.json says "),
    "missing": (lambda b: (b / "smoke.md").unlink(), "smoke.md: missing"),
    "extra": (lambda b: (b / "notes.txt").write_text("hi"), "notes.txt: present but not listed in manifest.json"),
    "no manifest": (lambda b: (b / "manifest.json").unlink(), "manifest.json: missing"),
    "bad manifest": (lambda b: (b / "manifest.json").write_text("[]"), "manifest.json: not a bundle manifest"),
}


@pytest.mark.parametrize("form", ["folder", "archive"])
@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_found(copy, case, form):
    tamper, start = TAMPERING[case]
    tamper(copy)
    problems = verify.verify(copy if form == "folder" else archive_of(copy))
    assert len(problems) == 1 and problems[0].startswith(start), problems


@pytest.mark.parametrize("where", [30, 0.5, -6])  # deflate blocks, a member's data, gzip's CRC
def test_a_corrupt_archive_fails(fresh, tmp_path, where):
    archive = tmp_path / f"{fresh.name}.tar.gz"
    data = bytearray((fresh / archive.name).read_bytes())
    data[int(len(data) * where) if isinstance(where, float) else where] ^= 1
    archive.write_bytes(data)
    [problem] = verify.verify(archive)
    assert problem.startswith("not a readable .tar.gz (") or "sha256" in problem, problem


def unsafe_archive(path, name, kind):
    with tarfile.open(path, "w:gz") as tar:
        member = tarfile.TarInfo(name)
        member.type, member.linkname = kind, "/etc/passwd"
        tar.addfile(member, io.BytesIO())
    return path


@pytest.mark.parametrize("name, kind, why", [
    ("../evil", tarfile.REGTYPE, "its path leaves the archive"),
    ("/tmp/evil", tarfile.REGTYPE, "its path leaves the archive"),
    ("tiny-phone/link", tarfile.SYMTYPE, "not a plain file or folder"),
])
def test_unsafe_members_are_refused_before_anything_is_unpacked(tmp_path, name, kind, why):
    (tmp_path / "in").mkdir()
    archive = unsafe_archive(tmp_path / "in" / "x.tar.gz", name, kind)
    assert verify.verify(archive) == [f"{name}: refused: {why}"]
    assert not (tmp_path / "evil").exists()


def test_main_names_the_first_problem_and_the_count(copy):
    flip_a_byte(copy / "model.pte")
    (copy / "smoke.md").unlink()
    with pytest.raises(UserError) as error:
        run_main(copy)
    message = str(error.value)
    assert message.startswith(f"{copy}: model.pte: sha256 ") and message.endswith(" (2 problems)")


@pytest.mark.parametrize("what", ["nothing", "a file"])
def test_not_a_bundle(tmp_path, what):
    target = tmp_path / "bundle"
    if what == "a file":
        target.write_text("hi")
    [problem] = verify.verify(target)
    assert problem.startswith("expected a bundle folder or a .tar.gz file; ")


def test_python_dash_m_exits_1_with_one_line_on_a_tampered_bundle(copy):
    flip_a_byte(copy / "model.pte")
    done = subprocess.run([sys.executable, "-m", "ane_build.bundle.verify", str(copy)], capture_output=True, text=True,
                          check=False)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"error: {copy}: model.pte: sha256 ") and done.stderr.count("\n") == 1
