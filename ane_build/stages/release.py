"""release: export + smoke entries -> the per-device bundle, as a folder and as a ``.tar.gz``.

The entry holds ``<name>/``, with ``<name>.tar.gz`` (the same files) inside it. The bundle is a folder
inside the entry, not the entry itself, because the store writes its own ``manifest.json`` at
the entry's top. It holds what a device app needs and what tells how it was made:

- ``model.pte``: the Core ML program;
- ``params.json``: the model's shape, as upstream ExecuTorch's runners read it (``--params``);
- the tokenizer file, and beside it ``chat_template.jinja`` where the checkpoint has a chat template;
- ``delegation.txt``: what Core ML took, and any op left on the CPU;
- ``lint.md``: what ``ane-build lint`` found in ``model.pte`` (unless the recipe turned it off);
- ``smoke.md``: the smoke test's generations, agreement and speeds;
- ``runner/``: the native runner's sources (``bundle.runner_sources``), which an app builds in;
- ``README.md``: for app developers: requirements, loading, the calling convention, running it
  with the runner, quality (``bundle_readme``, rendered from the manifest);
- ``manifest.json``: every other file's sha256 and size (by its path in the bundle), the recipe,
  the stage keys, the toolchain versions, the device and the smoke metrics (``ane-build verify``
  checks it).

The CPU twin (``twin.pte``) is left out: it stands in for ``model.pte`` on hosts without
Core ML, which a device is not, and would add a second copy of the weights to every download.
It stays in the export entry for hosts.

The archive is the same bytes for the same files (sorted members, no host times, owners or
modes, gzip without a time or file name, fixed blocks compressed on every core), so a rebuild
can be checked against a release.
"""

import collections
import concurrent.futures
import gzip
import json
import os
import shutil
import tarfile
from pathlib import Path

from ane_build.analysis import cost, lint
from ane_build.bundle import readme as bundle_readme
from ane_build.bundle import runner_sources
from ane_build.bundle.readme import README
from ane_build.bundle.verify import ARCHIVE_SUFFIX, MANIFEST, describe
from ane_build.cache import keys
from ane_build.model import io
from ane_build.recipe import recorded
from ane_build.stages import smoke
from ane_build.stages.export import MODEL_FILE
from ane_build.util.errors import UserError

FROM_EXPORT = (MODEL_FILE, io.PARAMS_FILE, "delegation.txt")  # + the tokenizer, chat template in spec.json
FROM_SMOKE = (smoke.REPORT_MD,)
# What a rebuild needs to give the same bytes (tests/test_tasks.py builds a recipe twice to check it).
REPRODUCIBLE = ("every file is rebuilt byte for byte by the same recipe and toolchain; the smoke numbers "
                "also need the same arithmetic (smoke.arithmetic)")


def run(inputs, params, out_dir):
    """inputs: {"export": dir, "smoke": dir}; params: {"recipe": the resolved recipe, "stage_keys": {stage: key}}."""
    export_dir, smoke_dir, out_dir = Path(inputs["export"]), Path(inputs["smoke"]), Path(out_dir)
    recipe = recorded(params["recipe"])
    name = bundle_name(recipe)
    runner_sources.files()  # missing: one error, before anything is written
    bundle = out_dir / name
    bundle.mkdir()
    spec = io.read_spec(export_dir)
    tokenizer_files = [spec["tokenizer"]] + ([spec["chat_template"]] if spec.get("chat_template") else [])
    for src in [export_dir / f for f in (*FROM_EXPORT, *tokenizer_files)] + [smoke_dir / f for f in FROM_SMOKE]:
        shutil.copyfile(src, bundle / src.name)
    if (export_dir / lint.MARKDOWN_FILE).exists():  # not with export.ane_lint: off
        shutil.copyfile(export_dir / lint.MARKDOWN_FILE, bundle / lint.MARKDOWN_FILE)
    runner_sources.copy(bundle)
    manifest = {
        "bundle": name,
        "device": recipe["device"],
        "files": {rel: describe(bundle / rel) for rel in bundle_files(bundle)},
        "recipe": recipe,
        "stage_keys": params["stage_keys"],
        "toolchain": keys.toolchain_versions(),
        "smoke": quality_summary(json.loads((smoke_dir / smoke.REPORT_JSON).read_text())),
        "methods": io.methods(spec["ane"]),
        "runner_metadata": spec["metadata"],
        "tokenizer": spec["tokenizer"],
        "chat_template": spec.get("chat_template"),
        "reproducible": REPRODUCIBLE,
        "decode_cost": decode_cost(export_dir, recipe["device"]),
        "ane_lint": lint_summary(export_dir),
    }
    # Rendered from the manifest without its own entry, which it then joins.
    (bundle / README).write_text(bundle_readme.render(manifest))
    manifest["files"][README] = describe(bundle / README)
    files = manifest["files"]
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    # Packed before it joins the folder, which then holds everything a release folder shows.
    archive = write_archive(bundle, out_dir / (name + ARCHIVE_SUFFIX)).rename(bundle / (name + ARCHIVE_SUFFIX))
    return {"bundle": name, "files": len(files) + 1, "bytes": sum(f["size"] for f in files.values()),
            "archive_bytes": archive.stat().st_size}


def quality_summary(report):
    """The smoke report's summary without its speeds (the build host's, different on every build),
    with the arithmetic its numbers depend on: a twin's fp16 program gives other numbers on a CPU
    computing in fp16 than on one computing in fp32 (``cpu_kernels``)."""
    summary = {k: v for k, v in report["summary"].items() if not k.endswith("_tokens_per_second")}
    kernels = report["runtime"].get("twin_kernels")
    return {**summary, "arithmetic": kernels["arithmetic"] if kernels else "Core ML"}


def lint_summary(export_dir):
    """What the export's Neural Engine lint found, by rule, and how many findings it allowed (None:
    not linted); lint.md in the bundle lists them."""
    path = export_dir / lint.JSON_FILE
    if not path.exists():
        return None
    report = json.loads(path.read_text())
    return {"clean": report["clean"], "by_rule": report["by_rule"], "allowlisted": report["allowlisted"]}


def decode_cost(export_dir, device):
    """The export's cost per decoded token of each method, and what the device's memory bandwidth
    bounds decoding at (None where the device's bandwidth is not known)."""
    methods = cost.read(export_dir)
    return {"methods": methods, "bound": methods and cost.decode_bound(methods, device)}


def bundle_name(recipe):
    """``release.name``, or the recipe name with "/" as "-"; it names a folder and a file."""
    name = recipe["release"].get("name") or recipe["name"].replace("/", "-")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise UserError("release.name", f"expected a file name (no / or \\); got {name!r}")
    return name


def bundle_files(bundle):
    """The files in ``bundle``, by their paths in it (POSIX form), sorted."""
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


def write_archive(bundle, path):
    """``bundle`` as ``<name>/<path>`` members of a .tar.gz that is the same bytes for the same files:
    its folders as members too, each before what it holds, in sorted order.

    Fastest compression: 4-bit weights hardly compress (on the default bundle's model.pte, zlib
    level 9 took 3.6 s to come out 0.8% smaller than level 1 in 2.8 s)."""
    with open(path, "wb") as raw, GzipMembers(raw) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_member(bundle.name, tarfile.DIRTYPE, 0o755))
        for f in sorted(bundle.rglob("*"), key=lambda p: p.relative_to(bundle).parts):
            member = f"{bundle.name}/{f.relative_to(bundle).as_posix()}"
            if f.is_dir():
                tar.addfile(_member(member, tarfile.DIRTYPE, 0o755))
                continue
            with open(f, "rb") as data:
                tar.addfile(_member(member, tarfile.REGTYPE, 0o644, f.stat().st_size), data)
    return path


class GzipMembers:
    """A writable gzip stream compressed on every core: each 16 MiB of input becomes one gzip
    member (a gzip file may hold several, one after another; every reader joins them), so
    blocks compress side by side. Members are written in order, without a time or file name,
    so the same input gives the same bytes."""

    BLOCK = 16 << 20

    def __init__(self, raw):
        self.raw, self.buffer, self.pending, self.written = raw, bytearray(), collections.deque(), 0
        self.workers = os.cpu_count() or 1
        self.pool = concurrent.futures.ThreadPoolExecutor(self.workers)  # zlib lets go of the GIL

    def tell(self):  # the position in the uncompressed stream, as tarfile asks of a file
        return self.written

    def write(self, data):
        self.written += len(data)
        self.buffer += data
        while len(self.buffer) >= self.BLOCK:
            self._submit(bytes(self.buffer[:self.BLOCK]))
            del self.buffer[:self.BLOCK]
        return len(data)

    def _submit(self, block):
        self.pending.append(self.pool.submit(gzip.compress, block, compresslevel=1, mtime=0))
        while len(self.pending) > 2 * self.workers or (self.pending and self.pending[0].done()):
            self.raw.write(self.pending.popleft().result())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                if self.buffer or not self.written:  # an empty input is one empty member
                    self._submit(bytes(self.buffer))
                while self.pending:
                    self.raw.write(self.pending.popleft().result())
        finally:
            self.pool.shutdown(cancel_futures=True)


def _member(name, kind, mode, size=0):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size = kind, mode, size
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info
